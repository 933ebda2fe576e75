"""A record's numbers against chance: runs that finished collapsed at chance accuracy, and a diverged run's best
top-1 before it diverged. Chance is that of the registered dataset's classes (``repro.data.DATASETS``)."""

from __future__ import annotations

import math
from typing import Any

from repro.data import DATASETS

#: how close to chance a finished run must end to count as collapsed (see ``is_collapsed``)
CHANCE_TOP1_FACTOR = 1.5
CHANCE_LOSS_RELATIVE = 0.02


def is_collapsed(record: dict[str, Any]) -> bool:
    """Whether a run finished (``ok``) at chance: top-1 at most 1.5x chance and a test loss within 2% of ln(C),
    the loss of a uniform prediction.

    Such a network stopped learning (a constant output) without a non-finite loss, so it is not ``diverged``; a
    claim must say how it counts (``collapsed_as``). Chance is that of the registered dataset's classes, so a
    generated stand-in with fewer classes (the ImageNet smoke tier's 4) is never flagged.
    """
    metrics = record.get("metrics") or {}
    top1, loss = metrics.get("top1"), metrics.get("loss")
    dataset = ((record.get("config") or {}).get("dataset") or {}).get("name")
    if record.get("status") != "ok" or dataset not in DATASETS or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (top1, loss)):
        return False
    classes = DATASETS.get(dataset).shape.num_classes
    chance_loss = math.log(classes)
    return top1 <= CHANCE_TOP1_FACTOR * 100 / classes and abs(loss - chance_loss) <= CHANCE_LOSS_RELATIVE * chance_loss


def best_top1_before_divergence(record: dict[str, Any]) -> float | None:
    """A diverged run's best test top-1 before it diverged: what a paper reports for it when its measure is the
    best accuracy reached (MimicNorm's Table 2). None for a run that did not diverge.

    Only epochs evaluated at a finite test loss count: the evaluation that found a NaN loss scores the argmax of
    NaN logits, not an accuracy. A run that diverged before its first such evaluation scores chance (100 / the
    registered dataset's classes), what its untrained network scores and what the paper reports for such runs;
    None when the dataset is not registered.
    """
    if record.get("status") != "diverged":
        return None
    reached = [point["test_top1"] for point in record.get("curve") or []
               if isinstance(point.get("test_loss"), int | float) and math.isfinite(point["test_loss"])
               and isinstance(point.get("test_top1"), int | float)]
    if reached:
        return float(max(reached))
    dataset = ((record.get("config") or {}).get("dataset") or {}).get("name")
    return 100 / DATASETS.get(dataset).shape.num_classes if dataset in DATASETS else None
