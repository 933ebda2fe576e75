"""Corruption metrics against hand computations with plain Python over the rows."""

import random

import pandas as pd
import pytest
import torch

from repro.adapt.metrics import error_row, mce, mean_error, relative_mce
from repro.errors import UserError

torch.set_num_threads(1)

# AlexNet's mean ImageNet-C error per corruption, typed from shared/reference/paper_numbers.md §7
# (augmix imagenet.py, taken from hendrycks/robustness).
ALEXNET = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


def random_rows(methods=("source", "tent"), batch_sizes=(64,), corruptions=tuple(ALEXNET), severities=range(1, 6),
                seed=0):
    rng = random.Random(seed)
    return [
        {"method": m, "corruption": c, "severity": s, "batch_size": b, "error": rng.uniform(5, 95), "n": 100}
        for m in methods for b in batch_sizes for c in corruptions for s in severities
    ]


def cell(rows, method, corruption, severity, batch_size=64):
    (error,) = [r["error"] for r in rows if (r["method"], r["corruption"], r["severity"], r["batch_size"])
                == (method, corruption, severity, batch_size)]
    return error


def test_error_row_counts_wrong_predictions():
    row = error_row("ptbn", "fog", 3, 2, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 0, 0, 4]), True)
    assert row == {"method": "ptbn", "corruption": "fog", "severity": 3, "batch_size": 2, "error": 100 * 2 / 5,
                   "n": 5, "adapted": True}
    with pytest.raises(UserError):
        error_row("ptbn", "fog", 3, 2, torch.tensor([]), torch.tensor([]), True)


def test_mean_error_is_the_plain_average_over_cells():
    rows = random_rows(batch_sizes=(1, 64), corruptions=("noise", "contrast"))
    result = mean_error(pd.DataFrame(rows))
    at_five = mean_error(rows, severities=[5])
    for method in ("source", "tent"):
        for b in (1, 64):
            cells = [r["error"] for r in rows if r["method"] == method and r["batch_size"] == b]
            assert result[(method, b)] == pytest.approx(sum(cells) / len(cells))
            five = [cell(rows, method, c, 5, b) for c in ("noise", "contrast")]
            assert at_five[(method, b)] == pytest.approx(sum(five) / 2)


def test_mce_normalizes_by_alexnet():
    rows = random_rows()
    result = mce(rows)
    for method in ("source", "tent"):
        ces = [100 * sum(cell(rows, method, c, s) / 100 for s in range(1, 6)) / (5 * ALEXNET[c]) for c in ALEXNET]
        assert result[(method, 64)] == pytest.approx(sum(ces) / 15)


def test_relative_mce_subtracts_clean_errors():
    rows = random_rows()
    alexnet_clean = 40.0  # a test value; the true AlexNet clean error is the caller's to supply
    clean = {("source", 64): 24.0, ("tent", 64): 26.5}
    result = relative_mce(rows, clean, alexnet_clean)
    for method in ("source", "tent"):
        rel = [sum(cell(rows, method, c, s) - clean[(method, 64)] for s in range(1, 6))
               / sum(100 * ALEXNET[c] - alexnet_clean for _ in range(1, 6)) for c in ALEXNET]
        assert result[(method, 64)] == pytest.approx(100 * sum(rel) / 15)
    same_clean = relative_mce(rows, 24.0, alexnet_clean)
    assert same_clean[("source", 64)] == pytest.approx(result[("source", 64)])
    with pytest.raises(UserError, match="percent"):
        relative_mce(rows, 24.0, 0.4)
    with pytest.raises(UserError, match="clean error"):
        relative_mce(rows, {("source", 64): 24.0}, alexnet_clean)


def test_mce_refuses_incomplete_or_unknown_results():
    with pytest.raises(UserError, match="missing"):
        mce(random_rows(severities=range(1, 5)))
    with pytest.raises(UserError, match="missing"):
        mce(random_rows(corruptions=tuple(ALEXNET)[:14]))
    with pytest.raises(UserError, match="AlexNet"):
        mce(random_rows(corruptions=("speckle_noise",)), corruptions=["speckle_noise"])
    rows = random_rows()
    with pytest.raises(UserError, match="repeat"):
        mce(rows + rows[:1])
    subset = ("fog", "snow")
    result = mce(random_rows(corruptions=subset), corruptions=subset)
    assert set(result.index) == {("source", 64), ("tent", 64)}
