"""Relative claims over seeds: paired differences, their standard error, and ``sigmas``; values chosen here."""

import math

import pytest

from repro.results.check import check
from repro.results.tables import records_frame, summarize, to_markdown
from repro.suite.expand import expand
from repro.suite.schema import Suite

BASE = {
    "name": "t", "version": 1, "description": "d", "citation": "c", "dataset": {"name": "fashion_mnist"},
    "backbones": ["resnet18"], "normalizers": ["bn", "gn"], "seeds": [0, 1, 2],
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.1}, "tiers": {"smoke": {}, "full": {}},
}
# top-1 per seed; paired differences bn − gn: 1.0, 2.0, 0.0 (mean 1.0, std 1.0, SE 1/sqrt(3))
TOP1 = {"bn": [94.0, 95.0, 93.0], "gn": [93.0, 93.0, 93.0]}


def frame(suite: Suite | None = None):
    """Records of the full tier's runs (the check counts only the runs its suite expands to)."""
    runs = {(r.setting["normalizer"], r.setting["seed"]): r.run_id for r in expand(suite, "full")} if suite else {}
    return records_frame([
        {"suite": "t", "suite_version": 1, "tier": "full", "run_id": runs.get((norm, seed), f"{norm}{seed}"),
         "status": "ok",
         "setting": {"backbone": "resnet18", "normalizer": norm, "seed": seed}, "metrics": {"top1": value},
         "wall_time_s": 1.0, "images_per_s": 1.0, "peak_memory_mb": 1.0}
        for norm, values in TOP1.items() for seed, value in enumerate(values)])


def claim(**extra):
    reference = {"kind": "relative", "id": "bn-beats-gn", "claim": "bn beats gn", "metric": "top1",
                 "a": {"normalizer": "bn"}, "b": {"normalizer": "gn"}, "source": "test", **extra}
    suite = Suite.model_validate({**BASE, "references": [reference]})
    (result,) = check(suite, frame(suite))
    return result


def test_paired_standard_error_is_reported():
    result = claim(min=0.0)
    assert result.status == "pass" and result.reproduced == pytest.approx(1.0)
    assert result.se == pytest.approx(1.0 / math.sqrt(3))
    assert "paired over 3 seeds 1.00 ± 0.58 SE" in result.detail


@pytest.mark.parametrize(("sigmas", "status"), [(1.0, "pass"), (1.7, "pass"), (1.8, "fail"), (3.0, "fail")])
def test_sigmas_requires_the_bound_at_mean_minus_k_se(sigmas, status):
    # mean − k·SE >= 0 holds while k <= sqrt(3) = 1.732
    assert claim(min=0.0, sigmas=sigmas).status == status


def test_sigmas_fails_without_two_paired_seeds():
    TOP1["gn"] = [93.0, None, None]
    try:
        result = claim(min=0.0, sigmas=1.0)
    finally:
        TOP1["gn"] = [93.0, 93.0, 93.0]
    assert result.status == "fail" and "needs 2+ paired seeds" in result.detail


def test_tables_show_the_standard_error_next_to_the_std():
    summary = summarize(frame(), ["backbone", "normalizer"]).set_index("normalizer")
    std = math.sqrt(((94 - 94) ** 2 + (95 - 94) ** 2 + (93 - 94) ** 2) / 2)
    assert summary.loc["bn", "top1_std"] == pytest.approx(std)
    assert summary.loc["bn", "top1_se"] == pytest.approx(std / math.sqrt(3))
    assert "94.00 ± 1.00 (SE 0.58)" in to_markdown(summary.reset_index(), ["backbone", "normalizer"], ["top1"])
