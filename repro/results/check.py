"""Compare reproduced numbers with a suite's references: absolute paper numbers and relative claims."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from repro.results.records import COMPLETE_STATUSES
from repro.results.tables import select
from repro.suite.expand import expand, matches
from repro.suite.schema import AbsoluteReference, RelativeReference, Suite
from repro.tasks.base import RunSpec

#: what a check can say: the claim holds, it does not, nothing of it ran, or some of its runs are missing or failed
STATUSES = ("pass", "fail", "not run", "incomplete")


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
    status: str  # one of STATUSES
    n: int  # runs whose values were used
    detail: str
    se: float | None = None  # standard error: of the paired per-seed differences (relative), of the runs (absolute)


@dataclass
class _Side:
    """The runs one setting of a reference expects at a tier, and what their records hold for the metric."""

    values: pd.Series
    per_seed: pd.Series  # the values' mean per seed, for paired differences
    expected: int
    used: int
    missing: int
    failed: int
    diverged: int
    has_metric: bool

    @property
    def gaps(self) -> str:
        parts = [f"{count} {what}" for count, what in ((self.missing, "missing"), (self.failed, "failed")) if count]
        return f"{' and '.join(parts)} of {self.expected} runs" if parts else ""


def _side(frame: pd.DataFrame, runs: list[RunSpec], setting: dict, metric: str, diverged_as: float | None = None
          ) -> _Side:
    """Only records of the runs the current expansion has for ``setting`` count; each run is ok, diverged,
    failed or missing, and only ok runs (and diverged ones, when ``diverged_as`` says what they count as) give
    values."""
    own = {k: v for k, v in setting.items() if runs and k in runs[0].setting}
    expected = {run.run_id for run in runs if matches(run.setting, own)}
    if frame.empty:
        empty = pd.Series(dtype=float)
        return _Side(empty, empty, len(expected), 0, len(expected), 0, 0, False)
    ours = frame[frame["run_id"].isin(expected)]
    status = ours.groupby("run_id")["status"].first()
    rows = select(ours, setting)
    failed = int((~status.isin(COMPLETE_STATUSES)).sum())
    diverged = int((status == "diverged").sum())
    has_metric = metric in rows.columns
    used_rows = rows[rows["status"] == "ok"] if has_metric else rows.iloc[0:0]
    values = pd.to_numeric(used_rows[metric], errors="coerce") if has_metric else pd.Series(dtype=float)
    if has_metric and diverged_as is not None:
        is_diverged = rows["status"] == "diverged"
        values = pd.concat([values, pd.Series(diverged_as, index=rows.index[is_diverged], dtype=float)])
        used_rows = rows[(rows["status"] == "ok") | is_diverged]
    values = values.dropna()
    used = used_rows.loc[values.index, "run_id"].nunique() if not values.empty else 0
    per_seed = values.groupby(rows.loc[values.index, "seed"]).mean() if "seed" in rows else pd.Series(dtype=float)
    return _Side(values, per_seed, len(expected), used, len(expected) - len(status), failed, diverged, has_metric)


def paired_differences(a: _Side, b: _Side, percent: bool) -> pd.Series:
    """a − b per seed that both settings ran (in % of b for a percent claim): the claim's paired sample."""
    a_seed, b_seed = a.per_seed.align(b.per_seed, join="inner")
    return 100 * (a_seed - b_seed) / b_seed if percent else a_seed - b_seed


def standard_error(values: pd.Series) -> float:
    """std (n − 1) / sqrt(n); NaN below two values."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else math.nan


def _unusable(side: _Side, metric: str) -> tuple[str, str] | None:
    """The status and reason when a side gives no number to compare: not run, incomplete, or no such metric."""
    if side.missing == side.expected:
        return "not run", "no records"
    if side.gaps:
        return "incomplete", side.gaps
    if not side.has_metric:
        return "fail", f"no metric {metric!r} in the records"
    if side.values.empty:
        return "fail", f"all {side.diverged} runs diverged" if side.diverged else "no record rows match the setting"
    return None


def _absolute(suite: str, tier: str, ref: AbsoluteReference, frame: pd.DataFrame, runs: list[RunSpec]
              ) -> CheckResult:
    side = _side(frame, runs, ref.setting, ref.metric)
    tolerance = f"±{ref.tolerance:g}"
    unusable = _unusable(side, ref.metric)
    if unusable:
        status, why = unusable
        return CheckResult(suite, tier, ref.id, "absolute", ref.metric, None, ref.value, None, tolerance, status,
                           side.used, f"{ref.source} ({why})")
    mean = float(side.values.mean())
    delta = mean - ref.value
    status = "pass" if abs(delta) <= ref.tolerance + 1e-9 else "fail"
    note = f"; {side.diverged} diverged runs left out" if side.diverged else ""
    se = standard_error(side.values)
    spread = "" if math.isnan(se) else f"reproduced {mean:.2f} ± {se:.2f} SE, n {len(side.values)}"
    detail = ref.source + (f" ({spread}{note})" if spread or note else "").replace("(; ", "(")
    return CheckResult(suite, tier, ref.id, "absolute", ref.metric, mean, ref.value, delta, tolerance, status,
                       side.used, detail, None if math.isnan(se) else se)


def _relative(suite: str, tier: str, ref: RelativeReference, frame: pd.DataFrame, runs: list[RunSpec]
              ) -> CheckResult:
    a = _side(frame, runs, ref.a, ref.metric, ref.diverged_as)
    b = _side(frame, runs, ref.b, ref.metric, ref.diverged_as)
    bounds = f"[{'-∞' if ref.min is None else f'{ref.min:g}'}, {'+∞' if ref.max is None else f'{ref.max:g}'}]"
    n = a.used + b.used
    reasons = {name: _unusable(side, ref.metric) for name, side in (("a", a), ("b", b))}
    if any(reasons.values()):
        statuses = [r[0] for r in reasons.values() if r]
        status = next(s for s in ("incomplete", "fail", "not run") if s in statuses)
        if status == "not run" and len(statuses) == 1:
            status = "incomplete"  # one side ran, the other did not
        why = "; ".join(f"{name}: {r[1]}" for name, r in reasons.items() if r)
        return CheckResult(suite, tier, ref.id, "relative", ref.metric, None, None, None, bounds, status, n,
                           f"{ref.claim} ({why})")
    difference = float(a.values.mean() - b.values.mean())
    if ref.percent:
        difference = 100 * difference / float(b.values.mean())
    pairs = paired_differences(a, b, ref.percent)
    se = standard_error(pairs)
    margin = 0.0 if ref.sigmas is None else ref.sigmas * se
    if ref.sigmas is not None and not math.isnan(se):
        difference = float(pairs.mean())
    ok = not math.isnan(margin) and (ref.min is None or difference - margin >= ref.min - 1e-9) and (
        ref.max is None or difference + margin <= ref.max + 1e-9)
    counted = "left out" if ref.diverged_as is None else f"counted as {ref.diverged_as:g}"
    note = f"; {a.diverged + b.diverged} diverged runs {counted}" if a.diverged + b.diverged else ""
    unit = " in % of b" if ref.percent else ""
    paired = f"; paired over {len(pairs)} seeds {pairs.mean():.2f} ± {se:.2f} SE" if len(pairs) >= 2 else ""
    if ref.sigmas is not None:
        paired += f"; must hold at ± {ref.sigmas:g} SE" + ("" if len(pairs) >= 2 else ", which needs 2+ paired seeds")
    detail = f"{ref.claim} (a {a.values.mean():.2f} − b {b.values.mean():.2f}{unit}{note}{paired})"
    return CheckResult(suite, tier, ref.id, "relative", ref.metric, difference, None, None, bounds,
                       "pass" if ok else "fail", n, detail, None if math.isnan(se) else se)


def check(suite: Suite, frame: pd.DataFrame) -> list[CheckResult]:
    """One result per reference and tier it applies to, over the records of the suite's current runs.

    A reference passes only when every run it expects has a complete record: settings without records are
    'not run', and missing or failed runs make it 'incomplete', never a pass on the runs that happened to work.
    """
    results = []
    expanded = {tier: expand(suite, tier) for tier in {t for ref in suite.references for t in ref.tiers}}
    for ref in suite.references:
        for tier in ref.tiers:
            tier_frame = frame[frame["tier"] == tier] if not frame.empty else frame
            judge = _absolute if isinstance(ref, AbsoluteReference) else _relative
            results.append(judge(suite.name, tier, ref, tier_frame, expanded[tier]))
    return results


def failing(results: list[CheckResult], *, strict: bool) -> list[CheckResult]:
    """The results that make a check fail: ``fail``, and under ``strict`` (CI, campaigns) also ``not run`` and
    ``incomplete``, so that a check cannot pass by checking nothing."""
    bad = ("fail", "not run", "incomplete") if strict else ("fail",)
    return [r for r in results if r.status in bad]


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def report_frame(results: list[CheckResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "suite": r.suite, "tier": r.tier, "reference": r.reference, "kind": r.kind, "metric": r.metric,
        "reproduced": _fmt(r.reproduced), "reported": _fmt(r.reported), "delta": _fmt(r.delta),
        "tolerance": r.tolerance, "n": r.n, "se": _fmt(r.se), "status": r.status, "detail": r.detail,
    } for r in results])
