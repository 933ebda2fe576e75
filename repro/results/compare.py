"""Regression report between two results folders: the same run ids, their metric deltas and a verdict.

Runs match by suite and run id (a hash of the resolved configuration, so a match is the same recipe). Every
numeric metric of a run, and of each row of a run that has rows (corruption x severity x method x test batch),
is compared as ``B - A``; timing and memory (``*_s``, ``*_ms``, ``*_per_s``, ``*_mb``, ``step_time_vs_bn``)
depend on the machine and load, so they are listed but never judged. The verdict is ``identical`` when every
judged delta is 0, ``within tolerance`` when none exceeds ``tolerance`` (in the metric's own unit: points of
top-1 or error), else ``differs``. Provenance fields that differ between the two sides (threads, library
versions, device, commit) are named, since they explain most differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from repro.errors import UserError
from repro.results.records import is_complete, iter_records
from repro.results.tables import RUN_FIELDS

TIMING_SUFFIXES = ("_s", "_ms", "_per_s", "_mb")
TIMING_METRICS = {"step_time_vs_bn", "ms_per_image", *RUN_FIELDS}
#: columns that identify a row within a run (the tta and similar tasks' per-row settings)
ROW_KEYS = ("method", "corruption", "severity", "batch_size")


def is_timing(metric: str) -> bool:
    return metric in TIMING_METRICS or metric.endswith(TIMING_SUFFIXES)


@dataclass
class Comparison:
    tolerance: float
    runs: pd.DataFrame  # per matched run: largest |delta|, its metric, verdict
    settings: pd.DataFrame  # per setting and metric: mean over seeds on each side, delta
    provenance: list[str]  # "field: A ... vs B ..." for every provenance field that differs
    only_a: int
    only_b: int

    @property
    def verdict(self) -> str:
        return verdict(self.runs["max_abs_delta"].max(), self.tolerance, self.runs["status_differs"].any())


def verdict(max_abs_delta: float, tolerance: float, status_differs: bool = False) -> str:
    if status_differs or max_abs_delta > tolerance:
        return "differs"
    return "identical" if max_abs_delta == 0 else "within tolerance"


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


def _records(results_dir: Path, suites: list[str] | None) -> dict[tuple[str, str], dict[str, Any]]:
    if not (results_dir / "runs").is_dir():
        raise UserError(f"{results_dir}: no runs/ folder; allowed: a results folder written by `repro run`")
    records = [r for suite in suites or [None] for r in iter_records(results_dir, suite)]
    return {(r["suite"], r["run_id"]): r for r in records if is_complete(r)}


def _provenance_differences(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    def flat(record: dict[str, Any]) -> dict[str, Any]:
        prov = dict(record.get("provenance") or {})
        packages = prov.pop("packages", None) or {}
        return {**prov, **{f"packages.{name}": version for name, version in packages.items()}}

    sides: dict[str, tuple[set[str], set[str]]] = {}
    for a, b in pairs:
        for side, record in enumerate((a, b)):
            for field, value in flat(record).items():
                sides.setdefault(field, (set(), set()))[side].add(str(value))
    return [f"{field}: A {', '.join(sorted(a))} vs B {', '.join(sorted(b))}"
            for field, (a, b) in sorted(sides.items()) if a != b]


def compare(results_a: Path, results_b: Path, *, tolerance: float = 0.5, suites: list[str] | None = None
            ) -> Comparison:
    """Compare the complete records that ``results_a`` and ``results_b`` share (same suite and run id)."""
    if tolerance < 0:
        raise UserError(f"--tolerance {tolerance}: must be at least 0")
    a, b = _records(results_a, suites), _records(results_b, suites)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise UserError(f"{results_a} and {results_b} have no complete run in common (same suite and run id)")
    run_rows, long_rows = [], []
    for key in shared:
        ra, rb = a[key], b[key]
        setting = {k: v for k, v in ra["setting"].items() if k != "seed"}
        values_a = {(e["row"], e["metric"]): e["value"] for e in _long_metrics(ra)}
        values_b = {(e["row"], e["metric"]): e["value"] for e in _long_metrics(rb)}
        deltas = {k: values_b[k] - values_a[k] for k in values_a.keys() & values_b.keys()}
        worst = max((k for k in deltas if deltas[k] != 0), key=lambda k: abs(deltas[k]), default=None)
        run_rows.append({
            "suite": key[0], "run_id": key[1], "tier": ra["tier"], "setting": _label(ra["setting"]),
            "status_a": ra["status"], "status_b": rb["status"], "status_differs": ra["status"] != rb["status"],
            "metrics": len(deltas), "max_abs_delta": abs(deltas[worst]) if worst else 0.0,
            "worst": _metric_label(*worst) if worst else "",
        })
        long_rows += [{"suite": key[0], "tier": ra["tier"], "setting": _label({**setting, **dict(row)}),
                       "metric": metric, "a": values_a[(row, metric)], "b": values_b[(row, metric)]}
                      for row, metric in deltas]
    runs = pd.DataFrame(run_rows)
    runs["verdict"] = [verdict(d, tolerance, s) for d, s in zip(runs["max_abs_delta"], runs["status_differs"],
                                                                 strict=True)]
    frame = pd.DataFrame(long_rows, columns=["suite", "tier", "setting", "metric", "a", "b"])
    settings = frame.groupby(["suite", "tier", "setting", "metric"], sort=False)[["a", "b"]].mean().reset_index()
    settings["delta"] = settings["b"] - settings["a"]
    provenance = _provenance_differences([(a[k], b[k]) for k in shared])
    return Comparison(tolerance, runs, settings, provenance, len(set(a) - set(b)), len(set(b) - set(a)))


def _label(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def _metric_label(row: tuple[tuple[str, Any], ...], metric: str) -> str:
    return f"{metric} ({_label(dict(row))})" if row else metric


def report(comparison: Comparison, results_a: Path, results_b: Path, max_settings: int = 25) -> str:
    """Markdown: provenance differences, per-run verdicts, the largest per-setting deltas, the overall verdict."""
    c = comparison
    lines = [f"# repro compare: A = {results_a}, B = {results_b}", "",
             f"{len(c.runs)} runs in common; {c.only_a} only in A, {c.only_b} only in B. Deltas are B - A; "
             f"tolerance {c.tolerance:g} (in each metric's unit); timing and memory are not judged.", "",
             "## Provenance that differs", ""]
    lines += [f"- {line}" for line in c.provenance] or ["- none"]
    runs = c.runs[["suite", "tier", "setting", "status_a", "status_b", "metrics", "max_abs_delta", "worst",
                   "verdict"]]
    lines += ["", "## Per run", "", runs.to_markdown(index=False, floatfmt=".4g"), ""]
    changed = c.settings[c.settings["delta"] != 0]
    changed = changed.reindex(changed["delta"].abs().sort_values(ascending=False).index).head(max_settings)
    lines += [f"## Per setting (mean over seeds; the {max_settings} largest nonzero deltas)", ""]
    lines += [changed.to_markdown(index=False, floatfmt=".4g") if len(changed) else "every delta is 0", ""]
    lines += [f"**Verdict: {c.verdict}** (largest |delta| {c.runs['max_abs_delta'].max():.4g}, "
              f"tolerance {c.tolerance:g})"]
    return "\n".join(lines)
