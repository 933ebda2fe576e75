"""Run an adaptation method over a stream of test batches and over corruption × severity views.

A *view* is a callable ``view(corruption, severity) -> (images, labels)``: a released dataset
(``repro.data.corrupted``) or corruptions computed on the fly. ``images`` is a uint8 N×C×H×W tensor or, for
sets too large to hold (ImageNet-C), a map-style Dataset of uint8 C×H×W tensors decoded in DataLoader workers.

Every view is read in one order, shuffled once from ``seed`` and shared by all methods and views (TENT:
"we control for ordering by shuffling and sharing the order across methods"), so every method adapts on
the same batches. The order matters: it decides which images share a batch, hence the batch statistics;
``seed=None`` keeps the file order, as TENT's CIFAR-10-C code does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader

from repro.adapt.base import AdaptationMethod
from repro.adapt.metrics import error_row
from repro.data.corrupted import CorruptionView, ImageSource
from repro.data.loaders import PixelNormalizer
from repro.errors import UserError

ResetPolicy = Literal["per_view", "online"]


def evaluation_order(n: int, seed: int | None) -> torch.Tensor:
    """The order in which the n images of a view are evaluated: a fixed permutation, or file order for None."""
    if seed is None:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def evaluate_stream(method: AdaptationMethod, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and labels of a stream of (normalized images, labels) batches, in stream order, on the CPU.

    Predictions stay on the device until the stream ends, so the loop never waits for the device.
    """
    predictions, targets = [], []
    for images, labels in batches:
        predictions.append(method.predict(images).argmax(1))
        targets.append(labels)
    if not predictions:
        raise UserError("the test stream has no batches")
    return torch.cat(predictions).cpu(), torch.cat(targets).cpu()


def view_batches(images: ImageSource, labels: torch.Tensor, order: torch.Tensor, batch_size: int, *,
                 device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], workers: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized batches of a view on ``device`` in ``order``; a Dataset view is decoded by DataLoader workers."""
    normalize = PixelNormalizer(mean, std, device, channels_last=False)
    labels = labels.to(device)
    chunks = order.to(device).split(batch_size)
    if isinstance(images, torch.Tensor):
        images = images.to(device)  # one copy per view instead of one per batch
        uint8_batches: Iterable[torch.Tensor] = (images[index] for index in chunks)
    else:
        uint8_batches = DataLoader(images, batch_size=batch_size, sampler=order.tolist(), num_workers=workers,
                                   pin_memory=device.type == "cuda")
    for index, batch in zip(chunks, uint8_batches, strict=True):
        yield normalize(batch.to(device, non_blocking=True)), labels[index]


@dataclass
class Evaluation:
    """One method at one test batch size under one reset policy; ``label`` names it in the result rows."""

    method: AdaptationMethod
    batch_size: int
    label: str
    reset: ResetPolicy = "per_view"

    def __post_init__(self) -> None:
        if self.reset not in ("per_view", "online"):
            raise UserError(f"reset policy {self.reset!r}; allowed: per_view, online")
        if self.batch_size < 1:
            raise UserError(f"test batch size must be >= 1, got {self.batch_size}")


def evaluate_views(evaluations: Sequence[Evaluation], view: CorruptionView, views: Sequence[tuple[str, int]], *,
                   mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu",
                   seed: int | None = 0, workers: int = 0) -> list[dict[str, object]]:
    """Evaluate every evaluation on every (corruption, severity) view, in the given order; one row per pair.

    Each view is read once and fed to all evaluations (a generated view costs more than evaluating it), in
    the order of ``evaluation_order(n, seed)``. Every method is reset when this starts; ``"per_view"``
    evaluations are reset again before each view, ``"online"`` ones carry their adaptation from view to view.
    ``mean`` and ``std`` are per-channel, in [0, 1] units, as ``ImageDataset.mean/std``.
    """
    device = torch.device(device)
    for evaluation in evaluations:
        evaluation.method.to(device)
    rows = []
    for corruption, severity in views:
        images, labels = view(corruption, severity)
        if len(images) != len(labels):
            raise UserError(f"{corruption} severity {severity}: {len(images)} images but {len(labels)} labels")
        order = evaluation_order(len(labels), seed)
        for evaluation in evaluations:
            method = evaluation.method
            if evaluation.reset == "per_view":
                method.reset()
            batches = view_batches(images, labels, order, evaluation.batch_size, device=device, mean=mean, std=std,
                                   workers=workers)
            predictions, targets = evaluate_stream(method, batches)
            rows.append(error_row(evaluation.label, corruption, severity, evaluation.batch_size, predictions, targets,
                                  method.adapts))
    return rows


def evaluate_corruptions(method: AdaptationMethod, view: CorruptionView, corruptions: Sequence[str],
                         severities: Sequence[int], *, mean: tuple[float, ...], std: tuple[float, ...],
                         batch_size: int, device: torch.device | str = "cpu", seed: int | None = 0,
                         reset: ResetPolicy = "per_view", workers: int = 0) -> list[dict[str, object]]:
    """Evaluate ``method`` on every (corruption, severity) view; one tidy result row per view.

    Views run severity-major (for each severity, every corruption), the official TENT example's loop.
    ``reset="per_view"`` restores the method before each view (the TENT example); ``"online"`` resets once at
    the start and lets the adaptation carry over from view to view, in that order.
    """
    views = [(corruption, severity) for severity in severities for corruption in corruptions]
    return evaluate_views([Evaluation(method, batch_size, method.name, reset)], view, views, mean=mean, std=std,
                          device=device, seed=seed, workers=workers)
