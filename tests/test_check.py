"""The check against references, on records the test constructs (values chosen here, not produced by the code)."""

import pandas as pd
import pytest
from pydantic import ValidationError
from scipy import stats

from repro.results.check import check
from repro.results.tables import records_frame, summarize
from repro.suite.expand import expand
from repro.suite.schema import Suite

BASE = {
    "name": "t", "version": 1, "description": "d", "citation": "c", "dataset": {"name": "fashion_mnist"},
    "backbones": ["resnet18"], "normalizers": ["bn", "gn", "none"], "seeds": [0, 1],
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.1}, "tiers": {"smoke": {}, "full": {}},
}


#: the run ids the suite expands to: check counts only records of the suite's current runs
RUN_IDS = {(r.setting["normalizer"], r.setting["seed"]): r.run_id for r in expand(Suite.model_validate(BASE), "full")}


def _record(normalizer: str, seed: int, top1: float | None, status: str = "ok") -> dict:
    return {"suite": "t", "suite_version": 1, "tier": "full", "run_id": RUN_IDS[normalizer, seed], "status": status,
            "setting": {"backbone": "resnet18", "normalizer": normalizer, "seed": seed},
            "metrics": {"top1": top1, "loss": 0.5}, "wall_time_s": 1.0, "images_per_s": 10.0, "peak_memory_mb": 1.0}


@pytest.fixture
def frame() -> pd.DataFrame:
    return records_frame([_record("bn", 0, 94.0), _record("bn", 1, 95.0), _record("gn", 0, 93.0),
                          _record("gn", 1, 93.6), _record("none", 0, None, "diverged"), _record("none", 1, 80.0)])


def _suite(*references: dict) -> Suite:
    return Suite.model_validate({**BASE, "references": list(references)})


def _absolute(value: float, tolerance: float) -> dict:
    return {"kind": "absolute", "id": "a", "metric": "top1", "value": value, "tolerance": tolerance,
            "setting": {"normalizer": "bn"}, "source": "s", "confidence": "P"}


def test_absolute_reference_is_judged_on_the_interval_of_our_mean(frame: pd.DataFrame) -> None:
    # bn: 94.0 and 95.0, mean 94.5, SE 0.5; the 95% t-interval with 1 degree of freedom is ± 12.706 · 0.5
    half = stats.t.ppf(0.975, 1) * 0.5
    (passed,) = check(_suite(_absolute(94.9, 10.0)), frame)
    assert passed.status == "pass" and passed.reproduced == pytest.approx(94.5)
    assert passed.delta == pytest.approx(94.5 - 94.9)
    assert (passed.low, passed.high) == (pytest.approx(94.5 - half), pytest.approx(94.5 + half))
    (straddling,) = check(_suite(_absolute(94.9, 1.0)), frame)
    assert straddling.status == "inconclusive"
    (failed,) = check(_suite(_absolute(120.0, 1.0)), frame)
    assert failed.status == "fail"


def test_reference_without_runs_is_not_run(frame: pd.DataFrame) -> None:
    ref = {**_absolute(94.9, 1.0), "setting": {"normalizer": "mimicnorm"}}
    smoke = {**_absolute(94.9, 1.0), "id": "b", "tiers": ["smoke"]}
    assert [r.status for r in check(_suite(ref, smoke), frame)] == ["not run", "not run"]


def test_relative_claims(frame: pd.DataFrame) -> None:
    # gn − bn per seed: −1.0 and −1.4 (mean −1.2, SE 0.2); at ± 1 SE [−1.4, −1.0]
    gn = {"kind": "relative", "id": "gn", "claim": "c", "metric": "top1", "a": {"normalizer": "gn"},
          "b": {"normalizer": "bn"}, "min": -0.9, "source": "s", "sigmas": 1.0}
    (result,) = check(_suite(gn), frame)
    assert result.reproduced == pytest.approx(93.3 - 94.5) and result.status == "fail"
    (loose,) = check(_suite({**gn, "min": -1.5}), frame)
    assert loose.status == "pass"
    (straddling,) = check(_suite({**gn, "min": -1.2}), frame)
    assert straddling.status == "inconclusive"


def test_diverged_runs_left_out_or_counted(frame: pd.DataFrame) -> None:
    claim = {"kind": "relative", "id": "none", "claim": "c", "metric": "top1", "a": {"normalizer": "none"},
             "b": {"normalizer": "bn"}, "max": -2.0, "source": "s"}
    (left_out,) = check(_suite(claim), frame)
    # seed 0 of none diverged: only seed 1 pairs (80.0 − 95.0)
    assert left_out.reproduced == pytest.approx(80.0 - 95.0) and "1 diverged runs left out" in left_out.detail
    assert left_out.n == 1 and left_out.status == "inconclusive"
    (counted,) = check(_suite({**claim, "diverged_as": 10.0}), frame)
    assert counted.reproduced == pytest.approx(((10.0 - 94.0) + (80.0 - 95.0)) / 2) and counted.n == 2


def _diverged(normalizer: str, seed: int, curve: list[tuple[float, float]]) -> dict:
    """A diverged record whose curve holds the test's (test_top1, test_loss) per epoch."""
    return {**_record(normalizer, seed, None, "diverged"), "config": {"dataset": {"name": "fashion_mnist"}},
            "curve": [{"epoch": epoch, "test_top1": top1, "test_loss": loss}
                      for epoch, (top1, loss) in enumerate(curve, 1)]}


def test_best_before_counts_a_diverged_run_at_its_best_top1_before_diverging() -> None:
    ok = [{**_record("bn", seed, None), "metrics": {"best_top1": top1}} for seed, top1 in ((0, 94.0), (1, 95.0))]
    # none seed 0 reached 61 then 72.5, and diverged in epoch 3 (whose evaluation of NaN logits is no accuracy);
    # seed 1 diverged in its first epoch: it reached nothing and counts at chance, 10.0 on Fashion-MNIST
    frame = records_frame([*ok, _diverged("none", 0, [(61.0, 1.1), (72.5, 0.8), (99.0, float("nan"))]),
                           _diverged("none", 1, [(10.0, float("nan"))])])
    claim = {"kind": "relative", "id": "best", "claim": "c", "metric": "best_top1", "a": {"normalizer": "bn"},
             "b": {"normalizer": "none"}, "min": 5.0, "source": "s", "diverged_as": "best_before"}
    (result,) = check(_suite(claim), frame)
    assert result.n == 2 and result.reproduced == pytest.approx(((94.0 - 72.5) + (95.0 - 10.0)) / 2)
    assert "2 diverged runs counted at their best top-1 before diverging" in result.detail
    (at_chance,) = check(_suite({**claim, "diverged_as": 10.0}), frame)
    assert at_chance.reproduced == pytest.approx(((94.0 - 10.0) + (95.0 - 10.0)) / 2), "a number still works"
    assert "best_top1_before_divergence" not in summarize(frame, ["backbone", "normalizer"]), "not a table metric"
    with pytest.raises(ValidationError, match="best_top1"):
        _suite({**claim, "metric": "top1"})


def test_must_not_diverge_fails_the_claim_on_a_diverged_run_of_a_named_side(frame: pd.DataFrame) -> None:
    # none seed 0 diverged; counted at 10.0, none − bn is (10 − 94) and (80 − 95): ± 1 SE [−84, −15] > −100
    claim = {"kind": "relative", "id": "trains", "claim": "c", "metric": "top1", "a": {"normalizer": "none"},
             "b": {"normalizer": "bn"}, "min": -100.0, "source": "s", "diverged_as": 10.0, "sigmas": 1.0}
    (counted,) = check(_suite(claim), frame)
    assert counted.status == "pass"
    (failed,) = check(_suite({**claim, "must_not_diverge": ["a"]}), frame)
    assert failed.status == "fail" and RUN_IDS["none", 0] in failed.detail and "must_not_diverge" in failed.detail
    (other_side,) = check(_suite({**claim, "must_not_diverge": ["b"]}), frame)
    assert other_side.status == "pass", "a diverged run of a side the claim does not name counts as diverged_as says"


def test_summary_mean_std_n(frame: pd.DataFrame) -> None:
    summary = summarize(frame, ["backbone", "normalizer"]).set_index("normalizer")
    assert summary.loc["bn", "top1_mean"] == pytest.approx(94.5)
    assert summary.loc["bn", "top1_std"] == pytest.approx(pd.Series([94.0, 95.0]).std())
    assert summary.loc["bn", "n"] == 2 and summary.loc["none", "n_diverged"] == 1
