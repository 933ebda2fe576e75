"""Compare reproduced numbers with a suite's references: absolute paper numbers and relative claims."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from repro.results.tables import select
from repro.suite.schema import AbsoluteReference, RelativeReference, Suite


@dataclass
class CheckResult:
    suite: str
    tier: str
    reference: str
    kind: str
    metric: str
    reproduced: float | None
    reported: float | None
    delta: float | None
    tolerance: str
    status: str  # "pass", "fail" or "not run"
    n: int
    detail: str
    se: float | None = None  # standard error: of the paired per-seed differences (relative), of the runs (absolute)


def _values(frame: pd.DataFrame, setting: dict, metric: str, diverged_as: float | None = None
            ) -> tuple[pd.Series, int, int]:
    """The metric's values for a setting, the number of runs, and how many of them diverged."""
    rows = select(frame, setting)
    if metric not in rows.columns:
        return pd.Series(dtype=float), 0, 0
    runs = rows["run_id"].nunique()
    is_diverged = rows["status"] == "diverged"
    values = pd.to_numeric(rows[metric], errors="coerce")
    if diverged_as is not None:
        values = values.mask(is_diverged, diverged_as)
    return values.dropna(), runs, rows.loc[is_diverged, "run_id"].nunique()


def _per_seed(frame: pd.DataFrame, setting: dict, metric: str, diverged_as: float | None) -> pd.Series:
    """The metric's mean per seed for a setting (diverged runs as ``_values`` counts them)."""
    rows = select(frame, setting)
    if metric not in rows.columns or "seed" not in rows.columns:
        return pd.Series(dtype=float)
    values = pd.to_numeric(rows[metric], errors="coerce")
    if diverged_as is not None:
        values = values.mask(rows["status"] == "diverged", diverged_as)
    return values.groupby(rows["seed"]).mean().dropna()


def paired_differences(frame: pd.DataFrame, ref: RelativeReference) -> pd.Series:
    """a − b per seed that both settings ran (in % of b for a percent claim): the claim's paired sample."""
    a = _per_seed(frame, ref.a, ref.metric, ref.diverged_as)
    b = _per_seed(frame, ref.b, ref.metric, ref.diverged_as)
    a, b = a.align(b, join="inner")
    return 100 * (a - b) / b if ref.percent else a - b


def standard_error(values: pd.Series) -> float:
    """std (n − 1) / sqrt(n); NaN below two values."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else math.nan


def _absolute(suite: str, tier: str, ref: AbsoluteReference, frame: pd.DataFrame) -> CheckResult:
    values, runs, diverged = _values(frame, ref.setting, ref.metric)
    tolerance = f"±{ref.tolerance:g}"
    if runs == 0:
        return CheckResult(suite, tier, ref.id, "absolute", ref.metric, None, ref.value, None, tolerance, "not run", 0,
                           ref.source)
    if values.empty:
        return CheckResult(suite, tier, ref.id, "absolute", ref.metric, None, ref.value, None, tolerance, "fail", runs,
                           f"all {diverged} runs diverged")
    mean = float(values.mean())
    delta = mean - ref.value
    status = "pass" if abs(delta) <= ref.tolerance + 1e-9 else "fail"
    se = standard_error(values)
    detail = ref.source if math.isnan(se) else f"{ref.source} (reproduced {mean:.2f} ± {se:.2f} SE, n {len(values)})"
    return CheckResult(suite, tier, ref.id, "absolute", ref.metric, mean, ref.value, delta, tolerance, status, runs,
                       detail, None if math.isnan(se) else se)


def _relative(suite: str, tier: str, ref: RelativeReference, frame: pd.DataFrame) -> CheckResult:
    a, runs_a, div_a = _values(frame, ref.a, ref.metric, ref.diverged_as)
    b, runs_b, div_b = _values(frame, ref.b, ref.metric, ref.diverged_as)
    bounds = f"[{'-∞' if ref.min is None else f'{ref.min:g}'}, {'+∞' if ref.max is None else f'{ref.max:g}'}]"
    n = runs_a + runs_b
    if runs_a == 0 or runs_b == 0:
        return CheckResult(suite, tier, ref.id, "relative", ref.metric, None, None, None, bounds, "not run", n,
                           ref.claim)
    if a.empty or b.empty:
        side = "a" if a.empty else "b"
        return CheckResult(suite, tier, ref.id, "relative", ref.metric, None, None, None, bounds, "fail", n,
                           f"{ref.claim} (every run of {side} diverged)")
    difference = float(a.mean() - b.mean())
    if ref.percent:
        difference = 100 * difference / float(b.mean())
    pairs = paired_differences(frame, ref)
    se = standard_error(pairs)
    margin = 0.0 if ref.sigmas is None else ref.sigmas * se
    if ref.sigmas is not None and not math.isnan(se):
        difference = float(pairs.mean())
    ok = not math.isnan(margin) and (ref.min is None or difference - margin >= ref.min - 1e-9) and (
        ref.max is None or difference + margin <= ref.max + 1e-9)
    counted = "left out" if ref.diverged_as is None else f"counted as {ref.diverged_as:g}"
    note = f"; {div_a + div_b} diverged runs {counted}" if div_a + div_b else ""
    unit = " in % of b" if ref.percent else ""
    paired = f"; paired over {len(pairs)} seeds {pairs.mean():.2f} ± {se:.2f} SE" if len(pairs) >= 2 else ""
    if ref.sigmas is not None:
        paired += f"; must hold at ± {ref.sigmas:g} SE" + ("" if len(pairs) >= 2 else ", which needs 2+ paired seeds")
    detail = f"{ref.claim} (a {a.mean():.2f} − b {b.mean():.2f}{unit}{note}{paired})"
    return CheckResult(suite, tier, ref.id, "relative", ref.metric, difference, None, None, bounds,
                       "pass" if ok else "fail", n, detail, None if math.isnan(se) else se)


def check(suite: Suite, frame: pd.DataFrame) -> list[CheckResult]:
    """One result per reference and tier it applies to; settings without runs are 'not run', not failures."""
    results = []
    for ref in suite.references:
        for tier in ref.tiers:
            tier_frame = frame[frame["tier"] == tier] if not frame.empty else frame
            if isinstance(ref, AbsoluteReference):
                results.append(_absolute(suite.name, tier, ref, tier_frame))
            else:
                results.append(_relative(suite.name, tier, ref, tier_frame))
    return results


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def report_frame(results: list[CheckResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "suite": r.suite, "tier": r.tier, "reference": r.reference, "kind": r.kind, "metric": r.metric,
        "reproduced": _fmt(r.reproduced), "reported": _fmt(r.reported), "delta": _fmt(r.delta),
        "tolerance": r.tolerance, "n": r.n, "se": _fmt(r.se), "status": r.status, "detail": r.detail,
    } for r in results])
