"""A battery's leaderboard: rows are its normalizers (or methods), columns the protocol's measures, each the mean
± standard error over seeds of the records of the battery's suites (``repro.suite.battery``)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from repro.results.gather import load_results
from repro.results.tables import markdown, select
from repro.store.atomic import write_text_atomic
from repro.suite.battery import Battery


def _cell(rows: pd.DataFrame, metric: str) -> dict[str, float | int]:
    """Mean, SE (NaN for one seed), seeds, and diverged runs among them, of ``metric`` over a column's rows."""
    diverged = int(rows.loc[rows["status"] == "diverged", "run_id"].nunique()) if not rows.empty else 0
    values = pd.to_numeric(rows.loc[rows["status"] == "ok", metric], errors="coerce").dropna() \
        if metric in rows else pd.Series(dtype=float)
    se = values.std() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": values.mean() if len(values) else math.nan, "se": se, "n": len(values) + diverged,
            "diverged": diverged}


def _text(cell: dict[str, float | int]) -> str:
    if cell["n"] == 0:
        return "not run"
    if cell["n"] == cell["diverged"]:
        return "diverged" if cell["n"] == 1 else f"diverged ({cell['n']}/{cell['n']})"
    text = f"{cell['mean']:.2f}" if math.isnan(cell["se"]) else f"{cell['mean']:.2f} ± {cell['se']:.2f}"
    return text + (f" ({cell['diverged']}/{cell['n']} diverged)" if cell["diverged"] else "")


def leaderboard(battery: Battery, results_dir: Path, tier: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The leaderboard as text cells (for markdown) and as numbers (mean, se, n, diverged per column)."""
    frames = {}
    for part, (_, path) in battery.suites.items():
        frame = load_results(results_dir, str(path)).frame
        frames[part] = frame[frame["tier"] == tier] if not frame.empty else frame
    row_key = "method" if battery.method else "normalizer"
    texts, numbers = [], []
    for row in battery.rows:
        text, number = {row_key: row}, {row_key: row}
        for column in battery.columns:
            cell = _cell(select(frames[column.part], {**column.where, row_key: row}), column.metric)
            text[column.title] = _text(cell)
            number.update({f"{column.title} {stat}": value for stat, value in cell.items()})
        texts.append(text)
        numbers.append(number)
    return pd.DataFrame(texts), pd.DataFrame(numbers)


def write_leaderboard(battery: Battery, results_dir: Path, tier: str) -> tuple[str, list[Path]]:
    """Write ``tables/battery-NAME.TIER.md`` and ``.csv``; return the markdown and the paths."""
    texts, numbers = leaderboard(battery, results_dir, tier)
    kind = "method" if battery.method else "normalizer"
    suites = ", ".join(suite.name for suite, _ in battery.suites.values())
    text = (f"# Battery: {kind} {battery.name} ({tier} tier)\n\nMean ± SE over seeds (one seed: the value); top1 in "
            f"%, C-error: mean error in % over the corruptions and severities. Suites: {suites}.\n\n"
            f"{markdown(texts)}\n")
    table, data = (results_dir / "tables" / f"battery-{battery.name}.{tier}.{suffix}" for suffix in ("md", "csv"))
    write_text_atomic(table, text)
    write_text_atomic(data, numbers.to_csv(index=False, float_format="%.4f"))
    return text, [table, data]
