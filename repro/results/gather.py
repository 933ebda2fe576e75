"""``repro gather`` and ``repro check`` over a results folder.

Only records that belong to the current expansion of a suite file count (a changed recipe changes run ids),
so an edited suite never mixes old and new numbers; records of suites with no file are tabulated as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from repro.errors import UserError
from repro.results.check import CheckResult, check, report_frame
from repro.results.records import iter_records
from repro.results.tables import markdown, metric_columns, records_frame, select, summarize, to_markdown
from repro.suite.expand import expand
from repro.suite.load import load_suite, resolve_suite_path
from repro.suite.schema import Suite
from repro.suite.validate import setting_columns
from repro.tasks.base import TASKS


@dataclass
class SuiteResults:
    name: str
    suite: Suite | None
    frame: pd.DataFrame
    stale: int


def expansion_order(suite: Suite) -> dict[str, int]:
    """Each current run id's position in the suite's expansion (tables list settings in the suite's order)."""
    runs = [run for tier in suite.tiers for run in expand(suite, tier)]  # ids differ across tiers (tier is config)
    return {run.run_id: index for index, run in enumerate(runs)}


def load_results(results_dir: Path, name: str) -> SuiteResults:
    records = iter_records(results_dir, name)
    try:
        suite, _ = load_suite(resolve_suite_path(name))
    except UserError:
        suite = None
    stale = 0
    if suite is not None:
        order = expansion_order(suite)
        stale = sum(r["run_id"] not in order for r in records)
        records = sorted((r for r in records if r["run_id"] in order), key=lambda r: order[r["run_id"]])
    return SuiteResults(name, suite, records_frame(records), stale)


def suite_names(results_dir: Path) -> list[str]:
    root = results_dir / "runs"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def columns_of(results: SuiteResults) -> list[str]:
    if results.suite is not None:
        return [*setting_columns(results.suite), *TASKS.get(results.suite.task).extra_columns]
    return [c for c in ("backbone", "normalizer") if c in results.frame.columns]


def write_plots(results: SuiteResults, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for plot in results.suite.plots if results.suite else []:
        for tier, tier_frame in results.frame.groupby("tier"):
            frame = select(tier_frame, plot.where)
            if frame.empty or plot.y not in frame or plot.x not in frame:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for line, part in frame.groupby(plot.line):
                stats = part.groupby(plot.x)[plot.y].agg(["mean", "std"]).sort_index()
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                            label=str(line))
            if plot.logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(plot.x)
            ax.set_ylabel(plot.y)
            ax.set_title(f"{results.name} ({tier})")
            ax.legend(title=plot.line, fontsize="small")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = folder / f"{results.name}.{plot.name}.{tier}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def gather(results_dir: Path, names: list[str] | None = None) -> list[tuple[SuiteResults, list[Path]]]:
    """Write ``tables/<suite>.csv`` and ``.md`` (mean ± std over seeds, n), plots, and ``README.md``."""
    tables = results_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or suite_names(results_dir):
        results = load_results(results_dir, name)
        if results.frame.empty:
            continue
        columns = columns_of(results)
        summary = summarize(results.frame, columns)
        summary.to_csv(tables / f"{name}.csv", index=False, float_format="%.4f")
        metrics = metric_columns(results.frame, columns)
        if results.suite is not None and TASKS.get(results.suite.task).table_metrics:
            metrics = [m for m in TASKS.get(results.suite.task).table_metrics if m in metrics]
        (tables / f"{name}.md").write_text(f"# {name}\n\n{to_markdown(summary, columns, metrics)}\n")
        results.frame.to_csv(tables / f"{name}.runs.csv", index=False, float_format="%.4f")
        written.append((results, [tables / f"{name}.csv", tables / f"{name}.md", *write_plots(results, tables)]))
    write_index(results_dir)
    return written


def run_checks(results_dir: Path, names: list[str] | None = None) -> list[CheckResult]:
    out: list[CheckResult] = []
    for name in names or suite_names(results_dir):
        results = load_results(results_dir, name)
        if results.suite is None:
            raise UserError(f"{name}: no suite file to check against (looked for suites/{name}.yaml)")
        out.extend(check(results.suite, results.frame))
    checks = results_dir / "checks"
    checks.mkdir(parents=True, exist_ok=True)
    for name, part in report_frame(out).groupby("suite") if out else []:
        table = markdown(part.drop(columns="suite"))
        (checks / f"{name}.md").write_text(f"# {name}: check\n\n{table}\n")
    write_index(results_dir)
    return out


def write_index(results_dir: Path) -> None:
    lines = ["# Results", "", "Generated by `repro gather` / `repro check`; do not edit by hand.", "",
             "| suite | runs | tiers | table | check |", "|---|---|---|---|---|"]
    for name in suite_names(results_dir):
        records = iter_records(results_dir, name)
        tiers = ", ".join(sorted({r["tier"] for r in records}))
        table = f"[table](tables/{name}.md)" if (results_dir / "tables" / f"{name}.md").exists() else "—"
        checked = f"[check](checks/{name}.md)" if (results_dir / "checks" / f"{name}.md").exists() else "—"
        lines.append(f"| {name} | {len(records)} | {tiers} | {table} | {checked} |")
    (results_dir / "README.md").write_text("\n".join(lines) + "\n")
