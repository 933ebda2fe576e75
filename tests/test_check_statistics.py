"""Verdicts from intervals over seeds: constructed paired differences, judged against scipy's t-distribution."""

import math

import pandas as pd
import pytest
from scipy import stats

from repro.results.check import check, failing, interval, seeds_to_decide, verdict
from repro.results.tables import records_frame, summarize, to_markdown
from repro.store.records import is_current
from repro.suite.expand import expand
from repro.suite.schema import NoiseFloor, Suite

BASE = {
    "name": "t", "version": 1, "description": "d", "citation": "c", "dataset": {"name": "fashion_mnist"},
    "backbones": ["resnet18"], "normalizers": ["bn", "gn"], "seeds": [0, 1, 2],
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.1}, "tiers": {"smoke": {}, "full": {}},
}


def frame(suite: Suite, top1: dict[str, list[float | None]], loss: float | None = None) -> pd.DataFrame:
    """Records of the full tier's runs (the check counts only the runs its suite expands to); each run's loss is
    its own unless ``loss`` is given, as two different trainings' losses are."""
    runs = {(r.setting["normalizer"], r.setting.get("train.micro_batch"), r.setting["seed"]): r
            for r in expand(suite, "full")}
    return records_frame([
        {"suite": "t", "suite_version": 1, "tier": "full", "run_id": run.run_id, "status": "ok",
         "shared_from": run.shared_with, "config": {"dataset": {"name": "fashion_mnist"}},
         "setting": {"backbone": "resnet18", "normalizer": norm, **({"train.micro_batch": micro} if micro else {}),
                     "seed": seed},
         "metrics": {"top1": top1[norm][seed], "loss": 0.5 + int(run.run_id[:6], 16) / 1e9 if loss is None else loss},
         "wall_time_s": 1.0, "images_per_s": 1.0, "peak_memory_mb": 1.0}
        for (norm, micro, seed), run in runs.items() if norm in top1])


def claim(top1: dict[str, list[float | None]], suite_fields: dict | None = None, **extra):
    reference = {"kind": "relative", "id": "bn-beats-gn", "claim": "bn beats gn", "metric": "top1",
                 "a": {"normalizer": "bn"}, "b": {"normalizer": "gn"}, "source": "test", **extra}
    suite = Suite.model_validate({**BASE, **(suite_fields or {}), "references": [reference]})
    (result,) = check(suite, frame(suite, top1))
    return result


def expected_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float]:
    n = len(differences)
    mean = sum(differences) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) / math.sqrt(n)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * se
    return mean - half, mean + half


def test_a_clear_effect_passes_and_its_interval_is_the_t_interval():
    # bn − gn per seed: 3.0, 4.0, 3.5
    result = claim({"bn": [94.0, 95.0, 94.5], "gn": [91.0, 91.0, 91.0]}, min=0.0)
    low, high = expected_interval([3.0, 4.0, 3.5])
    assert result.status == "pass" and result.n == 3
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))
    assert result.se == pytest.approx(0.5 / math.sqrt(3))
    assert low > 0


def test_a_clear_violation_fails():
    result = claim({"bn": [90.0, 90.5, 89.5], "gn": [93.0, 93.0, 93.0]}, min=0.0)
    low, high = expected_interval([-3.0, -2.5, -3.5])
    assert result.status == "fail" and high < 0
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))


def test_an_interval_straddling_the_bound_is_inconclusive_and_says_how_many_seeds_would_decide():
    # differences 1.0, 2.0, 0.0: mean 1.0, std 1.0; the 95% t-interval at n = 3 reaches below 0
    result = claim({"bn": [94.0, 95.0, 93.0], "gn": [93.0, 93.0, 93.0]}, min=0.0)
    low, high = expected_interval([1.0, 2.0, 0.0])
    assert result.status == "inconclusive" and low < 0 < high
    # the fewest n with t(n − 1) · 1.0 / sqrt(n) < 1.0
    needed = next(n for n in range(2, 100) if stats.t.ppf(0.975, n - 1) / math.sqrt(n) < 1.0)
    assert result.seeds_to_decide == needed == 7
    assert "about 7 seeds per side" in result.detail
    assert failing([result], strict=False) == [] and failing([result], strict=True) == [result]


def test_confidence_changes_the_interval():
    result = claim({"bn": [94.0, 95.0, 93.0], "gn": [93.0, 93.0, 93.0]}, min=0.0, confidence=0.5)
    low, high = expected_interval([1.0, 2.0, 0.0], 0.5)
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high)) and result.status == "pass"


@pytest.mark.parametrize(("sigmas", "status"), [(1.0, "pass"), (1.7, "pass"), (1.8, "inconclusive")])
def test_sigmas_stays_as_an_option(sigmas, status):
    # mean − k·SE >= 0 holds while k <= sqrt(3) = 1.732
    assert claim({"bn": [94.0, 95.0, 93.0], "gn": [93.0, 93.0, 93.0]}, min=0.0, sigmas=sigmas).status == status


def test_one_seed_per_side_is_inconclusive_unless_a_noise_floor_is_stated():
    one_seed = {"seeds": [0]}
    top1 = {"bn": [95.0], "gn": [93.0]}
    alone = claim(top1, one_seed, min=0.0)
    assert alone.status == "inconclusive" and alone.low is None and "noise_floor" in alone.detail
    floor = {"std": 0.5, "measured": "three seeds of the same recipe"}
    rested = claim(top1, one_seed, min=0.0, noise_floor=floor)
    half = stats.norm.ppf(0.975) * 0.5
    assert rested.status == "pass" and (rested.low, rested.high) == (pytest.approx(2.0 - half), pytest.approx(2 + half))
    assert "three seeds of the same recipe" in rested.detail
    assert claim(top1, one_seed, min=0.0, noise_floor={**floor, "std": 2.0}).status == "inconclusive"


MICRO = {"grid": {"train.micro_batch": [2, 8]}}


def gn_flat(top1, suite_fields=None):
    return claim(top1, {**MICRO, **(suite_fields or {})}, a={"normalizer": "gn", "train.micro_batch": 2},
                 b={"normalizer": "gn", "train.micro_batch": 8}, min=-1.0, max=1.0)


def test_sides_that_are_one_shared_run_read_by_construction():
    result = gn_flat({"gn": [93.0, 93.5, 92.8]})
    assert result.status == "by construction" and result.n == 0
    assert failing([result], strict=True) == [result]


def test_a_copied_record_stays_by_construction_after_its_seed_is_unshared():
    """A record written as a copy (shared_from) before the seed was unshared is not a measurement: the check
    reads what the record says, and the runner does not take it as current (``is_current``)."""
    tiers = {"tiers": {"smoke": {}, "full": {"unshared_seeds": [0, 1, 2]}}}
    suite = Suite.model_validate({**BASE, **MICRO, **tiers})
    primaries = {run.setting["seed"]: run.run_id for run in expand(suite, "full")
                 if run.setting["train.micro_batch"] == 2}
    copied = frame(suite, {"gn": [93.0, 93.5, 92.8]})
    copied["shared_from"] = [None if run_id in primaries.values() else primaries[seed]
                             for run_id, seed in zip(copied["run_id"], copied["seed"], strict=True)]
    reference = {"kind": "relative", "id": "flat", "claim": "c", "metric": "top1", "source": "s", "min": -1.0,
                 "max": 1.0, "a": {"normalizer": "gn", "train.micro_batch": 2},
                 "b": {"normalizer": "gn", "train.micro_batch": 8}}
    (result,) = check(Suite.model_validate({**BASE, **MICRO, **tiers, "references": [reference]}), copied)
    assert result.status == "by construction"
    assert not is_current({"status": "ok", "schema": 1, "shared_from": "x"}, None)
    assert is_current({"status": "ok", "schema": 1, "shared_from": "x"}, "x")


def test_runs_with_equal_metric_and_losses_are_one_computation():
    """GN's micro-batch 2 in one ghost pass is the whole batch's arithmetic: unshared, its numbers equal micro-batch
    32's to the last bit, and the claim still measures nothing."""
    tiers = {"tiers": {"smoke": {}, "full": {"unshared_seeds": [0, 1, 2]}}}
    suite = Suite.model_validate({**BASE, **MICRO, **tiers})
    same = frame(suite, {"gn": [93.0, 93.5, 92.8]}, loss=0.4)
    reference = {"kind": "relative", "id": "flat", "claim": "c", "metric": "top1", "source": "s", "min": -1.0,
                 "max": 1.0, "a": {"normalizer": "gn", "train.micro_batch": 2},
                 "b": {"normalizer": "gn", "train.micro_batch": 8}}
    (result,) = check(Suite.model_validate({**BASE, **MICRO, **tiers, "references": [reference]}), same)
    assert result.status == "by construction" and "to the last bit" in result.detail
    (measured,) = check(Suite.model_validate({**BASE, **MICRO, **tiers, "references": [reference]}),
                        frame(suite, {"gn": [93.0, 93.5, 92.8]}))
    assert measured.status == "pass" and measured.n == 3  # equal top-1 but the losses differ: measured


def test_an_unshared_seed_is_measured_and_shared_ones_are_left_out():
    tiers = {"tiers": {"smoke": {}, "full": {"unshared_seeds": [0]}}}
    suite = Suite.model_validate({**BASE, **MICRO, **tiers})
    runs = {(r.setting["train.micro_batch"], r.setting["seed"]): r for r in expand(suite, "full")}
    assert runs[8, 0].shared_with is None and runs[8, 1].shared_with == runs[2, 1].run_id
    result = gn_flat({"gn": [93.0, 93.5, 92.8]}, tiers)
    # the records give the same value to both sides of every seed; one seed is measured, so no interval
    assert result.status == "inconclusive" and result.n == 1 and "2 more seeds left out" in result.detail


def test_interval_helpers_against_scipy():
    values = pd.Series([1.0, 2.5, 0.5, 1.5])
    spread = interval(values, 0.9)
    half = stats.t.ppf(0.95, 3) * values.std(ddof=1) / 2
    assert (spread.low, spread.high) == (pytest.approx(1.375 - half), pytest.approx(1.375 + half))
    floor = interval(pd.Series([3.0]), 0.95, noise_floor=NoiseFloor(std=1.0, measured="m"))
    assert floor.high - floor.low == pytest.approx(2 * stats.norm.ppf(0.975))
    assert verdict(0.1, 0.9, 0.0, 1.0) == "pass" and verdict(1.1, 2.0, 0.0, 1.0) == "fail"
    assert verdict(-0.1, 0.5, 0.0, None) == "inconclusive" and verdict(None, None, 0.0, None) == "inconclusive"
    assert seeds_to_decide(1.0, 0.0, 0.95, 0.0, None) is None


def test_collapsed_runs_are_flagged_and_count_as_the_claim_says():
    ln10 = math.log(10)
    suite = Suite.model_validate({**BASE, "references": []})
    collapsed = frame(suite, {"bn": [10.0, 10.0, 10.0]}, loss=ln10 + 0.001)
    assert collapsed["collapsed"].all()
    assert not frame(suite, {"bn": [10.0, 10.0, 10.0]}, loss=1.5)["collapsed"].any()  # learning, not collapsed
    summary = summarize(collapsed, ["backbone", "normalizer"])
    assert summary["n_collapsed"].tolist() == [3]
    assert "collapsed" in to_markdown(summary, ["backbone", "normalizer"], ["top1"])


def test_two_methods_evaluated_by_one_run_are_two_computations():
    """A TTA run evaluates every method on the same model: its rows share a run id but not a computation."""
    suite = Suite.model_validate({**BASE, "normalizers": ["bn"], "references": [
        {"kind": "relative", "id": "ptbn-beats-source", "claim": "c", "metric": "error", "source": "s", "max": 0.0,
         "a": {"normalizer": "bn", "method": "ptbn"}, "b": {"normalizer": "bn", "method": "source"}}]})
    errors = {"source": [40.0, 41.0, 39.5], "ptbn": [20.0, 22.0, 19.0]}
    records = [{"suite": "t", "suite_version": 1, "tier": "full", "run_id": run.run_id, "status": "ok",
                "setting": run.setting, "metrics": {},
                "rows": [{"method": method, "error": values[run.setting["seed"]], "loss": 1.0}
                         for method, values in errors.items()]}
               for run in expand(suite, "full")]
    (result,) = check(suite, records_frame(records))
    assert result.status == "pass" and result.n == 3
    low, high = expected_interval([-20.0, -19.0, -20.5])
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))
