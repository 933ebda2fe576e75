"""Corruption metrics against hand computations with plain Python over the rows."""

import math
import random

import pandas as pd
import pytest
import torch

from repro.adapt.metrics import (
    brier_score,
    error_row,
    expected_calibration_error,
    mce,
    mean_error,
    negative_log_likelihood,
    relative_mce,
)
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
    probs = torch.eye(5)[[0, 1, 2, 3, 4]]
    row = error_row("ptbn", "fog", 3, 2, probs, torch.tensor([0, 1, 0, 0, 4]), True)
    assert {k: row[k] for k in ("method", "corruption", "severity", "batch_size", "error", "n", "adapted")} == {
        "method": "ptbn", "corruption": "fog", "severity": 3, "batch_size": 2, "error": 100 * 2 / 5, "n": 5,
        "adapted": True}
    with pytest.raises(UserError):
        error_row("ptbn", "fog", 3, 2, torch.zeros(0, 5), torch.tensor([], dtype=torch.long), True)


# Five images, three classes: top-1 confidences 0.9, 0.8, 0.55, 0.5, 0.35 (bins of width 1/15: 0.9 falls in
# (13/15, 14/15], 0.8 in (11/15, 12/15], 0.55 in (8/15, 9/15], 0.5 in (7/15, 8/15], 0.35 in (5/15, 6/15]).
CALIBRATION_PROBS = torch.tensor([
    [0.9, 0.05, 0.05],   # label 0: right
    [0.1, 0.8, 0.1],     # label 0: wrong
    [0.2, 0.25, 0.55],   # label 2: right
    [0.5, 0.3, 0.2],     # label 1: wrong
    [0.35, 0.33, 0.32],  # label 0: right
])
CALIBRATION_LABELS = torch.tensor([0, 0, 2, 1, 0])


def test_expected_calibration_error_by_hand():
    # every image alone in its bin: ECE = mean |correct − confidence|
    gaps = [abs(1 - 0.9), abs(0 - 0.8), abs(1 - 0.55), abs(0 - 0.5), abs(1 - 0.35)]
    assert expected_calibration_error(CALIBRATION_PROBS, CALIBRATION_LABELS) == pytest.approx(100 * sum(gaps) / 5)
    # two bins, (0, 0.5] and (0.5, 1]: {0.5, 0.35} with accuracy 1/2, {0.9, 0.8, 0.55} with accuracy 2/3
    low = abs(0.5 - (0.5 + 0.35) / 2)
    high = abs(2 / 3 - (0.9 + 0.8 + 0.55) / 3)
    expected = 100 * (2 / 5 * low + 3 / 5 * high)
    assert expected_calibration_error(CALIBRATION_PROBS, CALIBRATION_LABELS, bins=2) == pytest.approx(expected)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0.0


def test_nll_and_brier_by_hand():
    picked = [0.9, 0.1, 0.55, 0.3, 0.35]
    assert negative_log_likelihood(CALIBRATION_PROBS, CALIBRATION_LABELS) == pytest.approx(
        -sum(math.log(p) for p in picked) / 5)
    brier = 0.0
    for probs, label in zip(CALIBRATION_PROBS.tolist(), CALIBRATION_LABELS.tolist(), strict=True):
        brier += sum((p - (k == label)) ** 2 for k, p in enumerate(probs))
    assert brier_score(CALIBRATION_PROBS, CALIBRATION_LABELS) == pytest.approx(brier / 5)
    row = error_row("source", "fog", 1, 8, CALIBRATION_PROBS, CALIBRATION_LABELS, False)
    assert row["error"] == pytest.approx(40.0) and row["nll"] == pytest.approx(-sum(map(math.log, picked)) / 5)


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
