"""Corruption-benchmark metrics from tidy result rows.

One row per (method, corruption, severity, batch_size) with its ``error`` in percent and ``n`` images, as
``evaluate_corruptions`` returns them; every summary groups by ``group`` (method and test batch size by
default) so a DataFrame of many runs aggregates in one call.

- ``mean_error``: the plain average over corruption × severity cells (the only summary for CIFAR-10/100-C
  and Fashion-MNIST-C, which have no reference model); with ``severities=(5,)`` it is the number TENT and
  RobustBench report.
- ``mce`` / ``relative_mce``: ImageNet-C's AlexNet-normalized corruption errors (Hendrycks & Dietterich 2019).
- ``expected_calibration_error``, ``negative_log_likelihood``, ``brier_score``: calibration of the predicted
  probabilities, which Nado et al. 2020 report next to the error for prediction-time BN; every row has them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch

from repro.errors import UserError

# AlexNet's ImageNet-C error per corruption, averaged over severities 1-5, as a fraction: the CE denominators.
# Source: google-research/augmix imagenet.py ("Raw AlexNet errors taken from https://github.com/hendrycks/robustness"),
# listed in our references, shared/reference/paper_numbers.md §7.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
#: The 15 corruptions the ImageNet-C mCE averages over (hendrycks/robustness ImageNet-C/test.py).
BENCHMARK_CORRUPTIONS: tuple[str, ...] = tuple(ALEXNET_ERRORS)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
GROUP: tuple[str, ...] = ("method", "batch_size")

Rows = Iterable[Mapping[str, object]] | pd.DataFrame


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE in percent: Σ_m |B_m|/n · |accuracy(B_m) − confidence(B_m)| over equal-width confidence bins.

    Guo et al. 2017 (arXiv 1706.04599, Eq. 3): the top-1 confidence max_k p_k of each image falls in one of
    ``bins`` intervals ((0, 1/M], (1/M, 2/M], …, ((M−1)/M, 1]); empty bins contribute nothing.
    """
    probs, labels = probs.double(), labels.to(probs.device)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (lo, hi] intervals
    count = torch.zeros(bins, dtype=torch.float64, device=probs.device).index_add_(0, index, torch.ones_like(correct))
    gap = torch.zeros_like(count).index_add_(0, index, correct - confidence)
    return 100.0 * gap.abs().sum().item() / len(labels)


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log p_y (nats); a probability that underflowed to 0 counts as the smallest positive float32."""
    picked = probs.double().gather(1, labels.to(probs.device).view(-1, 1)).squeeze(1)
    return -picked.clamp_min(torch.finfo(torch.float32).tiny).log().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of Σ_k (p_k − 1[k = y])² (Brier 1950; the multi-class form Ovadia et al. 2019 report)."""
    target = torch.nn.functional.one_hot(labels.to(probs.device), probs.shape[1]).double()
    return (probs.double() - target).square().sum(1).mean().item()


def error_row(method: str, corruption: str, severity: int, batch_size: int, probs: torch.Tensor,
              labels: torch.Tensor, adapted: bool) -> dict[str, object]:
    """One tidy result row: top-1 error (%), ECE (%), NLL and Brier score of predicted probabilities (n × classes).

    ``adapted`` is False when the method predicted as the source model does (it found nothing to adapt).
    """
    n = len(labels)
    if n == 0:
        raise UserError(f"{corruption} severity {severity}: no images to evaluate")
    wrong = (probs.argmax(1) != labels.to(probs.device)).sum().item()
    return {"method": method, "corruption": corruption, "severity": severity, "batch_size": batch_size,
            "error": 100.0 * wrong / n, "ece": expected_calibration_error(probs, labels),
            "nll": negative_log_likelihood(probs, labels), "brier": brier_score(probs, labels), "n": n,
            "adapted": adapted}


def cell_errors(rows: Rows, group: Sequence[str] = GROUP, metric: str = "error") -> pd.Series:
    """``metric`` (error in % by default) indexed by (*group, corruption, severity); a cell given twice is an error."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    keys = [*group, "corruption", "severity"]
    missing = [k for k in [*keys, metric] if k not in frame.columns]
    if missing:
        raise UserError(f"result rows lack the columns {missing}")
    duplicated = frame[frame.duplicated(keys, keep=False)]
    if len(duplicated):
        raise UserError(f"result rows repeat cells: {duplicated[keys].drop_duplicates().to_dict('records')[:3]}")
    return frame.set_index(keys)[metric]


def mean_error(rows: Rows, severities: Sequence[int] | None = None, group: Sequence[str] = GROUP,
               metric: str = "error") -> pd.Series:
    """Plain mean error (%) over all corruption × severity cells (only ``severities`` when given).

    Another per-cell ``metric`` (``ece``, ``nll``, ``brier``) is averaged the same way, named ``mean_<metric>``.
    """
    errors = cell_errors(rows, group, metric)
    if severities is not None:
        errors = errors[errors.index.get_level_values("severity").isin(severities)]
        if errors.empty:
            raise UserError(f"no result rows at severities {list(severities)}")
    return errors.groupby(level=list(group)).mean().rename(f"mean_{metric}")


def corruption_errors(rows: Rows, corruptions: Sequence[str], group: Sequence[str] = GROUP) -> pd.DataFrame:
    """Mean error (%) over severities 1-5 per corruption: one column per corruption, one row per group.

    Every group needs all five severities of every corruption, as the CE definition sums over them.
    """
    errors = cell_errors(rows, group).unstack(["corruption", "severity"])
    wanted = pd.MultiIndex.from_product([list(corruptions), SEVERITIES], names=["corruption", "severity"])
    table = errors.reindex(columns=wanted)
    if table.isna().to_numpy().any():
        gaps = table.isna().stack(["corruption", "severity"], future_stack=True)
        raise UserError(f"missing corruption × severity results: {list(gaps[gaps].index)[:5]}")
    return table.T.groupby(level="corruption", sort=False).mean().T


def mce(rows: Rows, corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS, group: Sequence[str] = GROUP) -> pd.Series:
    """mCE (%): CE_c = 100 · mean_s E_{s,c} / E^AlexNet_c, averaged over the corruptions.

    Formula: Hendrycks & Dietterich 2019 (arXiv 1903.12261), CE_c = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c}, as
    computed by augmix's ``compute_mce`` (shared/reference/paper_numbers.md §7).
    """
    errors = corruption_errors(rows, corruptions, group)
    denominators = pd.Series({c: 100.0 * alexnet_error(c) for c in corruptions})
    return (100.0 * errors / denominators).mean(axis=1).rename("mce")


def relative_mce(rows: Rows, clean_error: float | Mapping | pd.Series, alexnet_clean_error: float,
                 corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS, group: Sequence[str] = GROUP) -> pd.Series:
    """Relative mCE (%): 100 · Σ_s (E_{s,c} − E_clean) / Σ_s (E^AlexNet_{s,c} − E^AlexNet_clean), averaged over c.

    Formula: Hendrycks & Dietterich 2019, §3 ("Relative mCE"). ``clean_error`` is the model's clean error (%),
    one number or one per group (a mapping keyed like the result's index); ``alexnet_clean_error`` is
    AlexNet's clean error (%), which our references do not verify, so the caller must supply it.
    """
    if not 1.0 < alexnet_clean_error < 100.0:
        raise UserError(f"alexnet_clean_error is in percent, got {alexnet_clean_error}")
    errors = corruption_errors(rows, corruptions, group)
    clean = pd.Series(clean_error, index=errors.index) if isinstance(clean_error, float | int) else pd.Series(
        clean_error).reindex(errors.index)
    if clean.isna().any():
        raise UserError(f"no clean error for {list(clean[clean.isna()].index)}")
    denominators = pd.Series({c: 100.0 * alexnet_error(c) - alexnet_clean_error for c in corruptions})
    return (100.0 * errors.sub(clean, axis=0) / denominators).mean(axis=1).rename("relative_mce")


def alexnet_error(corruption: str) -> float:
    try:
        return ALEXNET_ERRORS[corruption]
    except KeyError:
        raise UserError(f"no AlexNet error for {corruption!r}; mCE covers {', '.join(ALEXNET_ERRORS)}") from None
