"""Compare reproduced numbers with a suite's references: absolute paper numbers and relative claims.

A verdict comes from an interval, not a point. A relative claim is judged on the differences a − b paired by
seed: their mean and a t-interval (n − 1 degrees of freedom, ``confidence`` 95% by default). It passes when the
whole interval satisfies its bound, fails when the whole interval violates it, and is ``inconclusive`` when the
interval straddles the bound; then the check says how many seeds would decide it at the observed effect and
spread. An absolute reference is judged the same way: the interval of our mean against the reported value ±
tolerance. One run per side gives no interval: such a reference is ``inconclusive`` unless the suite states a
``noise_floor`` (the std of one difference or run, measured elsewhere) to rest on. Sides that are one computation
(a run ``shared_with`` the other) read ``by construction``: they measure nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd
from scipy import stats

from repro.results.tables import BEST_BEFORE_DIVERGENCE, select
from repro.store.records import COMPLETE_STATUSES
from repro.suite.expand import expand, matches
from repro.suite.schema import AbsoluteReference, NoiseFloor, RelativeReference, Suite
from repro.tasks.base import RunSpec

#: what a check can say: the whole interval satisfies the bound, the whole interval violates it, the interval
#: straddles it, the two sides are one computation, nothing of it ran, or some of its runs are missing or failed
STATUSES = ("pass", "fail", "inconclusive", "by construction", "not run", "incomplete")
#: the most seeds ``seeds_to_decide`` looks for; beyond it, the effect is too close to the bound to decide
MAX_SEEDS_TO_DECIDE = 1000


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
    n: int  # relative: seeds paired and measured per side; absolute: runs used
    detail: str
    se: float | None = None  # standard error: of the paired per-seed differences (relative), of the runs (absolute)
    #: the confidence interval of what is judged: the mean paired difference a − b (relative) or our mean (absolute)
    low: float | None = None
    high: float | None = None
    confidence: float = 0.95
    #: the bound the interval is judged against: the claim's min and max, or the reported value ± tolerance
    bound_min: float | None = None
    bound_max: float | None = None
    #: seeds per side that would decide an inconclusive claim at the observed effect and spread
    seeds_to_decide: int | None = None


@dataclass
class Interval:
    """Mean, spread and confidence interval of a sample; ``low``/``high`` are None when there is none."""

    mean: float
    std: float  # over the sample (n − 1); NaN below two values
    se: float
    low: float | None
    high: float | None
    rule: str  # how the interval was made, for the report


def interval(values: pd.Series, confidence: float, *, sigmas: float | None = None,
             noise_floor: NoiseFloor | None = None) -> Interval:
    """The t-interval of the mean (n − 1 degrees of freedom), or mean ± ``sigmas``·SE when a reference asks for
    it. One value has no spread of its own: its interval rests on a stated ``noise_floor`` (a normal interval
    with that std), or there is none."""
    n = len(values)
    mean = float(values.mean())
    if n >= 2:
        std = float(values.std(ddof=1))
        se = std / math.sqrt(n)
        if sigmas is not None:
            half, rule = sigmas * se, f"± {sigmas:g} SE"
        else:
            half, rule = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se, f"{confidence:.0%} t-interval"
        return Interval(mean, std, se, mean - half, mean + half, rule)
    if noise_floor is not None:
        half = float(stats.norm.ppf((1 + confidence) / 2)) * noise_floor.std
        return Interval(mean, math.nan, noise_floor.std, mean - half, mean + half,
                        f"{confidence:.0%} interval on the noise floor std {noise_floor.std:g} "
                        f"({noise_floor.measured})")
    return Interval(mean, math.nan, math.nan, None, None, "one value: no interval")


def verdict(low: float | None, high: float | None, bound_min: float | None, bound_max: float | None) -> str:
    """``pass`` when [low, high] lies within the bounds, ``fail`` when it lies wholly outside one of them,
    ``inconclusive`` when it straddles a bound or there is no interval."""
    if low is None or high is None:
        return "inconclusive"
    if (bound_min is not None and high < bound_min - 1e-9) or (bound_max is not None and low > bound_max + 1e-9):
        return "fail"
    if (bound_min is None or low >= bound_min - 1e-9) and (bound_max is None or high <= bound_max + 1e-9):
        return "pass"
    return "inconclusive"


def seeds_to_decide(mean: float, std: float, confidence: float, bound_min: float | None,
                    bound_max: float | None) -> int | None:
    """The fewest seeds whose t-interval, at this mean and per-seed std, would lie wholly on one side of the
    nearest bound; None when the spread is unknown or the mean sits on a bound."""
    if math.isnan(std) or std <= 0:
        return None
    distances = [abs(mean - bound) for bound in (bound_min, bound_max) if bound is not None]
    distance = min(distances)
    if distance <= 0:
        return None
    for n in range(2, MAX_SEEDS_TO_DECIDE + 1):
        if stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n) < distance:
            return n
    return None


@dataclass
class _Side:
    """The runs one setting of a reference expects at a tier, and what their records hold for the metric."""

    values: pd.Series
    per_seed: pd.Series  # the values' mean per seed, for paired differences
    #: per seed, the runs that computed this side's numbers (a run shared with another counts as that one)
    executions: dict[int, frozenset[tuple]]
    #: per seed, the metric with the test and training losses: equal on both sides only for equal arithmetic
    outcomes: dict[int, tuple[float, ...]]
    expected: int
    used: int
    missing: int
    failed: int
    diverged_runs: list[str]
    collapsed: int
    has_metric: bool

    @property
    def diverged(self) -> int:
        return len(self.diverged_runs)

    @property
    def gaps(self) -> str:
        parts = [f"{count} {what}" for count, what in ((self.missing, "missing"), (self.failed, "failed")) if count]
        return f"{' and '.join(parts)} of {self.expected} runs" if parts else ""


def _side(frame: pd.DataFrame, runs: list[RunSpec], setting: dict, metric: str,
          diverged_as: float | str | None = None, collapsed_as: float | None = None) -> _Side:
    """Only records of the runs the current expansion has for ``setting`` count; each run is ok, diverged,
    failed or missing, and only ok runs (and diverged ones, when ``diverged_as`` says what they count as: a
    number, or ``best_before``, the best top-1 they reached before diverging) give values. A collapsed run gives
    its own value, or ``collapsed_as`` when the claim says what it counts as."""
    own = {k: v for k, v in setting.items() if runs and k in runs[0].setting}
    expected = {run.run_id for run in runs if matches(run.setting, own)}
    if frame.empty:
        empty = pd.Series(dtype=float)
        return _Side(empty, empty, {}, {}, len(expected), 0, len(expected), 0, [], 0, False)
    ours = frame[frame["run_id"].isin(expected)]
    status = ours.groupby("run_id")["status"].first()
    rows = select(ours, setting)
    executions = _executions(rows)
    failed = int((~status.isin(COMPLETE_STATUSES)).sum())
    diverged_runs = sorted(status.index[status == "diverged"])
    has_metric = metric in rows.columns
    used_rows = rows[rows["status"] == "ok"] if has_metric else rows.iloc[0:0]
    values = pd.to_numeric(used_rows[metric], errors="coerce") if has_metric else pd.Series(dtype=float)
    is_collapsed = used_rows["collapsed"].astype(bool) if "collapsed" in used_rows else pd.Series(False, values.index)
    collapsed = int(used_rows.loc[is_collapsed, "run_id"].nunique()) if has_metric else 0
    if has_metric and collapsed_as is not None:
        values = values.where(~is_collapsed, collapsed_as)
    if has_metric and diverged_as is not None:
        is_diverged = rows["status"] == "diverged"
        if diverged_as == "best_before":  # the column exists wherever the frame holds a diverged record
            counted = pd.to_numeric(rows.loc[is_diverged].get(BEST_BEFORE_DIVERGENCE, pd.Series(dtype=float)),
                                    errors="coerce")
        else:
            counted = pd.Series(diverged_as, index=rows.index[is_diverged], dtype=float)
        values = pd.concat([values, counted])
        used_rows = rows[(rows["status"] == "ok") | is_diverged]
    values = values.dropna()
    used = used_rows.loc[values.index, "run_id"].nunique() if not values.empty else 0
    per_seed = values.groupby(rows.loc[values.index, "seed"]).mean() if "seed" in rows else pd.Series(dtype=float)
    return _Side(values, per_seed, executions, _outcomes(rows, metric), len(expected), used,
                 len(expected) - len(status), failed, diverged_runs, collapsed, has_metric)


#: columns that tell apart the rows one run computes (a TTA run: method, corruption, severity, test batch)
ROW_KEYS = ("method", "corruption", "severity", "batch_size")


def _executions(rows: pd.DataFrame) -> dict[int, frozenset[tuple]]:
    """Per seed, what computed a side's rows: the run (a record copied from another run, ``shared_from``, stands
    for that one) and the row within it, so that two methods evaluated by one TTA run stay two computations."""
    if rows.empty or "seed" not in rows:
        return {}
    computed_by = rows["shared_from"].where(rows["shared_from"].notna(), rows["run_id"]) if (
        "shared_from" in rows) else rows["run_id"]
    keys = [column for column in ROW_KEYS if column in rows]
    identity = pd.Series([(run, *row) for run, row in zip(computed_by, rows[keys].itertuples(index=False),
                                                           strict=True)], index=rows.index)
    return {seed: frozenset(ids) for seed, ids in identity.groupby(rows["seed"]).agg(set).items()}


#: continuous results that two different computations do not share to the last bit
LOSS_COLUMNS = ("loss", "train_loss")


def _outcomes(rows: pd.DataFrame, metric: str) -> dict[int, tuple[float, ...]]:
    """Per seed, the metric and the losses (mean over the seed's rows); empty without a loss to tell by."""
    columns = [c for c in (metric, *LOSS_COLUMNS) if c in rows]
    if "seed" not in rows or len(columns) < 2 or not set(LOSS_COLUMNS) & set(columns):
        return {}
    numbers = rows[columns].apply(pd.to_numeric, errors="coerce")
    return {seed: tuple(means) for seed, means in numbers.groupby(rows["seed"]).mean().iterrows()}


def _one_computation(a: _Side, b: _Side, seed: int) -> bool:
    """Whether a and b of ``seed`` are one computation: the same run (shared), or runs whose metric and losses are
    equal to the last bit, which only the same arithmetic gives (GN's one-pass micro-batches)."""
    if a.executions.get(seed) == b.executions.get(seed):
        return True
    outcome = a.outcomes.get(seed)
    return outcome is not None and outcome == b.outcomes.get(seed) and not any(map(math.isnan, outcome))


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


def _fmt_interval(spread: Interval) -> str:
    if spread.low is None:
        return spread.rule
    return f"[{spread.low:.2f}, {spread.high:.2f}] ({spread.rule})"


def _decide_note(status: str, spread: Interval, confidence: float, bound_min: float | None,
                 bound_max: float | None, n: int) -> tuple[int | None, str]:
    """For an inconclusive verdict: the seeds that would decide it, as a number and a phrase."""
    if status != "inconclusive":
        return None, ""
    if n < 2:
        return None, "; one seed per side: run more seeds or state a noise_floor"
    needed = seeds_to_decide(spread.mean, spread.std, confidence, bound_min, bound_max)
    if needed is None:
        return None, f"; more than {MAX_SEEDS_TO_DECIDE} seeds would be needed at this effect and spread"
    return needed, f"; about {needed} seeds per side would decide it at this effect and spread"


def _absolute(suite: str, tier: str, ref: AbsoluteReference, frame: pd.DataFrame, runs: list[RunSpec]
              ) -> CheckResult:
    side = _side(frame, runs, ref.setting, ref.metric, collapsed_as=ref.collapsed_as)
    tolerance = f"±{ref.tolerance:g}"
    bound_min, bound_max = ref.value - ref.tolerance, ref.value + ref.tolerance
    unusable = _unusable(side, ref.metric)
    if unusable:
        status, why = unusable
        return CheckResult(suite, tier, ref.id, "absolute", ref.metric, None, ref.value, None, tolerance, status,
                           side.used, f"{ref.source} ({why})", confidence=ref.confidence_level,
                           bound_min=bound_min, bound_max=bound_max)
    spread = interval(side.values, ref.confidence_level, noise_floor=ref.noise_floor)
    status = verdict(spread.low, spread.high, bound_min, bound_max)
    needed, decide = _decide_note(status, spread, ref.confidence_level, bound_min, bound_max, len(side.values))
    notes = [f"reproduced {spread.mean:.2f}" + ("" if math.isnan(spread.std) else f" ± {spread.se:.2f} SE")
             + f", n {len(side.values)}", _fmt_interval(spread), f"within {ref.value:g} {tolerance}?"]
    if ref.paper_std is not None:
        notes.append(f"the paper's std {ref.paper_std:g}")
    if side.diverged:
        notes.append(f"{side.diverged} diverged runs left out")
    if side.collapsed:
        notes.append(f"{side.collapsed} collapsed runs " + (
            "at their own value" if ref.collapsed_as is None else f"counted as {ref.collapsed_as:g}"))
    return CheckResult(suite, tier, ref.id, "absolute", ref.metric, spread.mean, ref.value, spread.mean - ref.value,
                       tolerance, status, side.used, f"{ref.source} ({'; '.join(notes)}{decide})",
                       None if math.isnan(spread.se) else spread.se, spread.low, spread.high, ref.confidence_level,
                       bound_min, bound_max, needed)


def _relative(suite: str, tier: str, ref: RelativeReference, frame: pd.DataFrame, runs: list[RunSpec]
              ) -> CheckResult:
    a = _side(frame, runs, ref.a, ref.metric, ref.diverged_as, ref.collapsed_as)
    b = _side(frame, runs, ref.b, ref.metric, ref.diverged_as, ref.collapsed_as)
    bounds = bounds_text(ref.min, ref.max)
    common = {"confidence": ref.confidence, "bound_min": ref.min, "bound_max": ref.max}
    against = _diverged_against_claim(ref, {"a": a, "b": b})
    if against:
        return CheckResult(suite, tier, ref.id, "relative", ref.metric, None, None, None, bounds, "fail",
                           min(a.used, b.used), f"{ref.claim} ({against})", **common)
    reasons = {name: _unusable(side, ref.metric) for name, side in (("a", a), ("b", b))}
    if any(reasons.values()):
        statuses = [r[0] for r in reasons.values() if r]
        status = next(s for s in ("incomplete", "fail", "not run") if s in statuses)
        if status == "not run" and len(statuses) == 1:
            status = "incomplete"  # one side ran, the other did not
        why = "; ".join(f"{name}: {r[1]}" for name, r in reasons.items() if r)
        return CheckResult(suite, tier, ref.id, "relative", ref.metric, None, None, None, bounds, status,
                           min(a.used, b.used), f"{ref.claim} ({why})", **common)
    pairs = paired_differences(a, b, ref.percent)
    constructed = [seed for seed in pairs.index if _one_computation(a, b, seed)]
    measured = pairs.drop(index=constructed)
    unit = " in % of b" if ref.percent else ""
    if measured.empty:
        return CheckResult(suite, tier, ref.id, "relative", ref.metric, float(pairs.mean()), None, None, bounds,
                           "by construction", 0, f"{ref.claim} (a and b are one computation for all "
                           f"{len(pairs)} seeds (shared runs, or equal metric and losses to the last bit): the "
                           f"difference {pairs.mean():.2f}{unit} measures nothing; run a seed of each side "
                           "unshared)", **common)
    spread = interval(measured, ref.confidence, sigmas=ref.sigmas, noise_floor=ref.noise_floor)
    status = verdict(spread.low, spread.high, ref.min, ref.max)
    needed, decide = _decide_note(status, spread, ref.confidence, ref.min, ref.max, len(measured))
    notes = [f"n {len(measured)} seeds per side, a − b {spread.mean:.2f}{unit}"
             + ("" if math.isnan(spread.std) else f" ± {spread.se:.2f} SE"), _fmt_interval(spread)]
    if constructed:
        notes.append(f"{len(constructed)} more seeds left out as one computation on both sides")
    if a.diverged + b.diverged:
        notes.append(f"{a.diverged + b.diverged} diverged runs {_diverged_counted(ref.diverged_as)}")
    if a.collapsed + b.collapsed:
        notes.append(f"collapsed runs a {a.collapsed}, b {b.collapsed} " + (
            "at their own value" if ref.collapsed_as is None else f"counted as {ref.collapsed_as:g}"))
    detail = f"{ref.claim} (a {a.per_seed.mean():.2f} − b {b.per_seed.mean():.2f}; {'; '.join(notes)}{decide})"
    return CheckResult(suite, tier, ref.id, "relative", ref.metric, spread.mean, None, None, bounds, status,
                       len(measured), detail, None if math.isnan(spread.se) else spread.se, spread.low, spread.high,
                       seeds_to_decide=needed, **common)


def bounds_text(low: float | None, high: float | None) -> str:
    """A claim's bounds as ``[min, max]``, an open side as -∞ or +∞."""
    return f"[{'-∞' if low is None else f'{low:g}'}, {'+∞' if high is None else f'{high:g}'}]"


def _diverged_against_claim(ref: RelativeReference, sides: dict[str, _Side]) -> str:
    """Why the claim fails outright: diverged runs on a side it names ``must_not_diverge``; empty when none.

    A claim that a setting trains (``a trains where b fails``, ``a within 1 point of b``) is contradicted by that
    setting's diverged run whatever number it would count as: at chance it only lowers a mean that a wide margin
    absorbs, and at its best top-1 before diverging (``best_before``) it counts as trained. Which sides must
    train is the claim's to state, not the bounds': a diverged b-run leaves "a within 1 point of b" without its
    baseline (counted at chance it would even help), but is what "a trains where b fails" predicts. The fail
    stands with runs missing: no further run can undo it.
    """
    named = [f"{name}: {', '.join(sides[name].diverged_runs)}" for name in ref.must_not_diverge
             if sides[name].diverged_runs]
    return f"diverged runs where the claim says training works (must_not_diverge): {'; '.join(named)}" if (
        named) else ""


def _diverged_counted(diverged_as: float | str | None) -> str:
    """How a claim counted its diverged runs, for the report."""
    if diverged_as is None:
        return "left out"
    if diverged_as == "best_before":
        return "counted at their best top-1 before diverging (chance if before their first evaluation)"
    return f"counted as {diverged_as:g}"


def check(suite: Suite, frame: pd.DataFrame) -> list[CheckResult]:
    """One result per reference and tier it applies to, over the records of the suite's current runs.

    A reference can pass only when every run it expects has a complete record: settings without records are
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
    """The results that make a check fail: ``fail``, and under ``strict`` (CI, campaigns) everything that is not
    a measured pass: ``inconclusive``, ``by construction``, ``not run`` and ``incomplete``, so that a check cannot
    pass by checking nothing or by too few seeds."""
    bad = ("fail", "inconclusive", "by construction", "not run", "incomplete") if strict else ("fail",)
    return [r for r in results if r.status in bad]


def format_number(value: float | None) -> str:
    """Two decimals, or — where there is no number (None or NaN)."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def to_json(results: list[CheckResult]) -> list[dict]:
    """The results as JSON-ready objects, every field of ``CheckResult``; a number that is not finite is None."""
    def finite(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return [{key: finite(value) for key, value in asdict(result).items()} for result in results]


def report_frame(results: list[CheckResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "suite": r.suite, "tier": r.tier, "reference": r.reference, "kind": r.kind, "metric": r.metric,
        "reproduced": format_number(r.reproduced), "reported": format_number(r.reported),
        "delta": format_number(r.delta),
        "tolerance": r.tolerance, "n": r.n, "se": format_number(r.se),
        "interval": "—" if r.low is None else f"[{r.low:.2f}, {r.high:.2f}]",
        "status": r.status, "detail": r.detail,
    } for r in results])
