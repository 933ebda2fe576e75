"""The run-time estimate counts what the trainer does: passes per step, shared runs, cached models."""

import copy

import pytest

from repro.execute.estimate import (
    DEVICES,
    calibration_factor,
    estimate_run_seconds,
    estimate_runs_seconds,
    training_seconds,
)
from repro.suite.expand import expand
from repro.suite.load import load_suite


@pytest.fixture(scope="module")
def runs():
    suite, _ = load_suite("fmnist-microbatch")
    return {(r.setting["normalizer"], r.setting["train.micro_batch"]): r for r in expand(suite, "smoke")}


def test_sequential_micro_batches_cost_passes_and_one_pass_costs_less(runs):
    def seconds(micro_batch: int, mixup: float, batch: int = 16) -> float:
        config = copy.deepcopy(runs["bn", micro_batch].config)
        config["train"]["mixup_alpha"] = mixup  # mixup keeps the sequential path
        config["train"]["batch_size"] = batch
        return training_seconds(config, DEVICES["h200"])

    assert seconds(4, mixup=0.2) > 2 * seconds(16, mixup=0.2)  # 4 passes per step against 1
    # ghost batches: one pass of a few more operations instead of 16 passes
    assert seconds(4, mixup=0.0, batch=64) < seconds(4, mixup=0.2, batch=64) / 3


def test_shared_runs_are_free_and_a_cached_model_is_trained_once(runs):
    every = list(runs.values())
    unshared = sum(estimate_run_seconds(r.config, "h200") for r in every if not r.shared_with)
    assert any(r.shared_with for r in every)
    assert estimate_runs_seconds(every, "h200") == pytest.approx(unshared)
    loader = copy.deepcopy(runs["bn", 4])
    loader.config["task"], loader.config["task_options"] = "quantize", {}
    once = estimate_runs_seconds([loader], "h200")
    training = training_seconds(loader.config, DEVICES["h200"])
    assert training > 0
    assert estimate_runs_seconds([loader, loader], "h200") == pytest.approx(2 * once - training)


def test_calibration_factor_is_measured_over_estimated(runs):
    config = runs["bn", 4].config
    estimate = estimate_run_seconds(config, "h200")
    record = {"status": "ok", "config": config, "wall_time_s": 2 * estimate,
              "provenance": {"device": "cuda", "device_name": "NVIDIA H200"}}
    assert calibration_factor([record], "h200") == pytest.approx(2.0)
    assert calibration_factor([{**record, "shared_from": "abc"}], "h200") is None
    assert calibration_factor([record], "cpu") is None
