"""Regression report between two results folders: the same run ids, their metric deltas and a verdict.

Runs match by suite and run id (a hash of the resolved configuration, so a match is the same recipe and seed),
or with ``match="setting"`` by suite, tier and setting (seed included): two recipes of the same settings, for
example float32 records against bf16 ones, whose run ids differ because the precision is part of the config.
Every numeric metric of a run, and of each row of a run that has rows (corruption x severity x method x test
batch), is compared as ``B - A``; timing and memory (``*_s``, ``*_ms``, ``*_per_s``, ``*_mb``, ``step_time_vs_bn``)
depend on the machine and load, so they are listed but never judged.

Judging is per setting (a run's setting without its seed, per suite, tier and row) and metric. Where the two
sides share 2 or more seeds of it, the differences paired by seed give a mean, its standard error and a
t-interval (``confidence``, n - 1 degrees of freedom): ``identical`` when every difference is 0, ``within noise``
when the interval contains 0, else ``differs``; side A's standard deviation over those seeds is reported next to
it as the yardstick of seed noise. A setting with a single seed in common has no noise estimate, so a fixed
``tolerance`` (in the metric's own unit: points of top-1 or error) judges it: ``identical``, ``within tolerance``
or ``differs``. A run whose status differs between the sides (``ok`` vs ``diverged``, or a complete record on one
side against a ``failed`` or unreadable one on the other) makes its setting differ, and so does a metric that one
side has as a number and the other lacks (or holds as text); a metric that is nan (or the same infinity) on both
sides agrees, nan on one side only differs. A run complete on one side with no record at all on the other is
counted as only in A (or B), not judged: a results folder may hold a subset of the runs.
The overall verdict is ``differs`` if any setting differs. Provenance fields that differ are named, those that
change numbers first (precision, device, threads, torch and library versions, data), then the rest (commit,
platform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from repro.errors import UserError
from repro.results.chance import is_collapsed
from repro.results.tables import RUN_FIELDS
from repro.store.records import is_complete, read_record

TIMING_SUFFIXES = ("_s", "_ms", "_per_s", "_mb")
TIMING_METRICS = {"step_time_vs_bn", "ms_per_image", *RUN_FIELDS}
#: columns that identify a row within a run (the tta and similar tasks' per-row settings)
ROW_KEYS = ("method", "corruption", "severity", "batch_size")
#: provenance fields that change numbers, listed first in this order (then ``packages.*`` and the data's
#: fingerprint, then the rest)
NUMERIC_PROVENANCE = ("precision", "device", "device_name", "cpu_threads", "processes", "torch", "cuda", "cudnn")
INTERVAL_RULE, TOLERANCE_RULE = "interval over n seeds", "tolerance, single run"
MATCHES = ("run_id", "setting")


def is_timing(metric: str) -> bool:
    return metric in TIMING_METRICS or metric.endswith(TIMING_SUFFIXES)


@dataclass
class Comparison:
    tolerance: float
    confidence: float
    runs: pd.DataFrame  # per matched run: statuses, largest |delta| and its metric
    settings: pd.DataFrame  # per setting, row and metric: paired seeds, mean delta, SE, interval, A's std, verdict
    provenance: list[str]  # "field: A ... vs B ..." for every provenance field that differs, numeric ones first
    only_a: int
    only_b: int

    @property
    def verdict(self) -> str:
        status_differs = ["differs"] if self.runs["status_differs"].any() else []
        return overall_verdict([*self.settings["verdict"], *status_differs])


def overall_verdict(verdicts: list[str]) -> str:
    """``differs`` if any setting differs, else the kinds of agreement found (``identical`` when all are)."""
    if "differs" in verdicts:
        return "differs"
    within = [kind for kind in ("noise", "tolerance") if f"within {kind}" in verdicts]
    return f"within {' and '.join(within)}" if within else "identical"


def delta(a: float, b: float) -> float:
    """``b - a``; 0 where both are equal, infinities included, or both are nan (a metric that a row does not
    measure, on both sides, agrees)."""
    return 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else b - a


def judge(a: np.ndarray, deltas: np.ndarray, tolerance: float, confidence: float) -> dict[str, Any]:
    """One setting's metric over its seeds in common (side A's values and the deltas, paired by seed): the
    t-interval of the deltas where there are 2 or more, else the tolerance rule. A nan delta (nan on one side
    only) differs under both rules."""
    n = len(deltas)
    mean = float(deltas.mean())
    if n == 1:
        verdict = "identical" if mean == 0 else "within tolerance" if abs(mean) <= tolerance else "differs"
        return {"n": 1, "a": float(a[0]), "delta": mean, "se": math.nan, "low": math.nan, "high": math.nan,
                "a_std": math.nan, "rule": TOLERANCE_RULE, "verdict": verdict}
    se = float(deltas.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se
    low, high = mean - half, mean + half
    verdict = "identical" if not deltas.any() else "within noise" if low <= 0 <= high else "differs"
    return {"n": n, "a": float(a.mean()), "delta": mean, "se": se, "low": low, "high": high,
            "a_std": float(a.std(ddof=1)), "rule": INTERVAL_RULE, "verdict": verdict}


def _long_metrics(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's judged metrics as (row key, metric, value) entries: its metrics, then those of each of its rows."""
    entries = []
    for row in [record.get("metrics") or {}, *(record.get("rows") or [])]:
        key = tuple((k, row[k]) for k in ROW_KEYS if k in row)
        for metric, value in row.items():
            if metric in ROW_KEYS or is_timing(metric) or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                entries.append({"row": key, "metric": metric, "value": float(value)})
    return entries


def _records(results_dir: Path, suites: list[str] | None) -> dict[tuple[str, str], dict[str, Any] | None]:
    """Every record file by (suite, run id), whatever its status; None for one that is unreadable or malformed
    (reported by path): a record that B broke must not pass for one that B never had."""
    root = results_dir / "runs"
    if not root.is_dir():
        raise UserError(f"{results_dir}: no runs/ folder; allowed: a results folder written by `repro run`")
    folders = [root / suite for suite in suites] if suites else sorted(p for p in root.iterdir() if p.is_dir())
    records: dict[tuple[str, str], dict[str, Any] | None] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            record = read_record(path)
            records[(record["suite"], record["run_id"]) if record else (folder.name, path.stem)] = record
    return records


def _by_setting(records: dict[tuple[str, str], dict[str, Any] | None], results_dir: Path
                ) -> dict[tuple[str, str], dict[str, Any] | None]:
    """The same records keyed by suite and ``tier setting`` (seed included) instead of run id. Two records of one
    setting in a folder (two recipes of it) or an unreadable one (no setting to match by) cannot be placed."""
    keyed: dict[tuple[str, str], dict[str, Any] | None] = {}
    for (suite, run_id), record in records.items():
        if record is None:
            raise UserError(f"{results_dir / 'runs' / suite / run_id}.json: unreadable record; --match setting "
                            "needs every record's setting (move it aside or use --match run_id)")
        key = (suite, f"{record['tier']} {_label(record['setting'])}")
        if key in keyed:
            other = keyed[key]["run_id"]  # type: ignore[index]
            raise UserError(f"{results_dir}: runs {other} and {run_id} of suite {suite} have one setting "
                            f"({key[1]}); --match setting needs one record per setting on each side")
        keyed[key] = record
    return keyed


def precision(record: dict[str, Any]) -> str | None:
    """The precision a training run actually ran at: ``train.amp`` is bf16 autocast on CUDA only (the trainer
    ignores it elsewhere); ``amp_cpu`` (the same on CPU) and ``precision`` (stated outright) count where a
    config has them. None for a run without a training config."""
    train = (record.get("config") or {}).get("train")
    if not train:
        return None
    device = (record.get("provenance") or {}).get("device")
    if "precision" in train:
        return f"{train['precision']} on {device}"
    flag = {"cuda": "amp", "cpu": "amp_cpu"}.get(device)
    autocast = bool(flag and train.get(flag))
    return f"{'bf16 autocast' if autocast else 'fp32'} on {device}"


def _provenance_differences(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    def flat(record: dict[str, Any]) -> dict[str, Any]:
        prov = dict(record.get("provenance") or {})
        packages = prov.pop("packages", None) or {}
        return {"precision": precision(record), **prov,
                **{f"packages.{name}": version for name, version in packages.items()}}

    def rank(field: str) -> tuple[int, str]:
        if field in NUMERIC_PROVENANCE:
            return NUMERIC_PROVENANCE.index(field), field
        numeric = field.startswith("packages.") or field == "data_fingerprint"
        return len(NUMERIC_PROVENANCE) + (0 if numeric else 1), field

    sides: dict[str, tuple[set[str], set[str]]] = {}
    for a, b in pairs:
        for side, record in enumerate((a, b)):
            for field, value in flat(record).items():
                sides.setdefault(field, (set(), set()))[side].add(str(value))
    return [f"{field}: A {', '.join(sorted(a))} vs B {', '.join(sorted(b))}"
            for field, (a, b) in sorted(sides.items(), key=lambda item: rank(item[0])) if a != b]


def _status(record: dict[str, Any] | None) -> str:
    """A run's status, with a finish at chance named: ``ok`` and ``ok, collapsed`` are different outcomes."""
    if record is None:
        return "unreadable record"
    return f"{record['status']}, collapsed" if is_collapsed(record) else record["status"]


def compare(results_a: Path, results_b: Path, *, tolerance: float = 0.5, confidence: float = 0.95,
            suites: list[str] | None = None, match: str = "run_id") -> Comparison:
    """Compare the runs (same suite and run id, or setting with ``match="setting"``) that have a record on both
    sides, complete on one at least."""
    if not tolerance >= 0:  # also refuses nan
        raise UserError(f"--tolerance {tolerance}: must be at least 0")
    if not 0 < confidence < 1:
        raise UserError(f"--confidence {confidence}: must be between 0 and 1, exclusive (e.g. 0.95)")
    if match not in MATCHES:
        raise UserError(f"--match {match}: allowed: {', '.join(MATCHES)}")
    a, b = _records(results_a, suites), _records(results_b, suites)
    if match == "setting":
        a, b = _by_setting(a, results_a), _by_setting(b, results_b)
    complete_a, complete_b = {k for k in a if is_complete(a[k])}, {k for k in b if is_complete(b[k])}
    shared = sorted((set(a) & set(b)) & (complete_a | complete_b))  # complete on one side at least
    if not shared:
        same = "suite and run id" if match == "run_id" else "suite, tier and setting"
        raise UserError(f"{results_a} and {results_b} have no complete run in common (same {same})")
    run_rows, paired, statuses, lost = [], {}, {}, {}
    for key in shared:
        ra, rb = a[key], b[key]
        known = ra if key in complete_a else rb
        status_a, status_b = _status(ra), _status(rb)
        setting = (key[0], known["tier"], _label({k: v for k, v in known["setting"].items() if k != "seed"}))
        values_a = {(e["row"], e["metric"]): e["value"] for e in _long_metrics(ra or {})}
        values_b = {(e["row"], e["metric"]): e["value"] for e in _long_metrics(rb or {})}
        lacking = {k: "B" if k in values_a else "A" for k in values_a.keys() ^ values_b.keys()}
        deltas = {k: math.nan if k in lacking else delta(values_a[k], values_b[k])
                  for k in values_a.keys() | values_b.keys()}
        worst = max((k for k in deltas if deltas[k] != 0), key=lambda k: (math.isnan(deltas[k]), abs(deltas[k])),
                    default=None)
        run_rows.append({
            "suite": key[0], "run_id": known["run_id"], "tier": known["tier"], "setting": _label(known["setting"]),
            "status_a": status_a, "status_b": status_b, "status_differs": status_a != status_b,
            "metrics": len(deltas), "max_abs_delta": abs(deltas[worst]) if worst else 0.0,
            "worst": _metric_label(*worst) if worst else "",
        })
        if status_a != status_b:
            statuses.setdefault(setting, set()).add(f"A {status_a}, B {status_b}")
        for row, metric in sorted(deltas, key=str):
            judged_key = (*setting, _label(dict(row)), metric)
            paired.setdefault(judged_key, []).append((values_a.get((row, metric), math.nan), deltas[(row, metric)]))
            if (row, metric) in lacking:
                lost.setdefault(judged_key, set()).add(f"no number in {lacking[(row, metric)]}")
    settings = []
    for (suite, tier, setting, row, metric), values in paired.items():
        judged = judge(*np.array(values).T, tolerance, confidence)
        notes = statuses.get((suite, tier, setting), set()) | lost.get((suite, tier, setting, row, metric), set())
        status = "; ".join(sorted(notes))
        if status:
            judged["verdict"] = "differs"
        settings.append({"suite": suite, "tier": tier, "setting": setting, "row": row, "metric": metric, **judged,
                         "status": status})
    columns = ["suite", "tier", "setting", "row", "metric", "n", "a", "delta", "se", "low", "high", "a_std", "rule",
               "verdict", "status"]
    provenance = _provenance_differences([(a[k], b[k]) for k in shared if a[k] and b[k]])
    return Comparison(tolerance, confidence, pd.DataFrame(run_rows), pd.DataFrame(settings, columns=columns),
                      provenance, len(complete_a - set(b)), len(complete_b - set(a)))


def _label(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def _metric_label(row: tuple[tuple[str, Any], ...], metric: str) -> str:
    return f"{metric} ({_label(dict(row))})" if row else metric


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4g}"


def report(comparison: Comparison, results_a: Path, results_b: Path, max_settings: int = 25) -> str:
    """Markdown: provenance differences, per-run statuses and deltas, the judged settings (those that differ
    first, then the largest deltas), the overall verdict."""
    c = comparison
    level = f"{100 * c.confidence:g}%"
    lines = [f"# repro compare: A = {results_a}, B = {results_b}", "",
             f"{len(c.runs)} runs in common; {c.only_a} only in A, {c.only_b} only in B. Deltas are B - A; a setting "
             f"with 2 or more seeds in common is judged by the {level} t-interval of its differences paired by seed, "
             f"one with a single seed by tolerance {c.tolerance:g} (in each metric's unit); timing and memory are "
             "not judged.", "",
             "## Provenance that differs (fields that change numbers first)", ""]
    lines += [f"- {line}" for line in c.provenance] or ["- none"]
    runs = c.runs[["suite", "tier", "setting", "status_a", "status_b", "metrics", "max_abs_delta", "worst"]]
    lines += ["", "## Per run", "", runs.to_markdown(index=False, floatfmt=".4g"), ""]

    judged = c.settings[c.settings["verdict"] != "identical"]
    judged = judged.assign(order=(judged["verdict"] != "differs"), size=-judged["delta"].abs())
    shown = judged.sort_values(["order", "size"], na_position="first").head(max_settings)
    table = pd.DataFrame({
        "suite": shown["suite"], "tier": shown["tier"],
        "setting": [" ".join(filter(None, (s, r))) for s, r in zip(shown["setting"], shown["row"], strict=True)],
        "metric": shown["metric"], "n": shown["n"], "mean delta": shown["delta"].map(_number),
        "SE": shown["se"].map(_number),
        f"{level} interval": [f"[{low:.4g}, {high:.4g}]" if not math.isnan(low) else ""
                              for low, high in zip(shown["low"], shown["high"], strict=True)],
        "A seed std": shown["a_std"].map(_number), "verdict": shown["verdict"], "rule": shown["rule"],
        "status": shown["status"]})
    counts = c.settings["verdict"].value_counts()
    summary = ", ".join(f"{counts[v]} {v}" for v in ("differs", "within noise", "within tolerance", "identical")
                        if v in counts)
    lines += [f"## Per setting ({len(c.settings)} setting metrics: {summary or 'none'}; "
              f"not identical, those that differ first, then by |mean delta|, at most {max_settings})", ""]
    lines += [table.to_markdown(index=False) if len(table) else "every delta is 0", ""]
    lines += [f"**Verdict: {c.verdict}** ({summary or 'no judged metric'}; {level} intervals over paired seeds, "
              f"tolerance {c.tolerance:g} for single runs)"]
    return "\n".join(lines)
