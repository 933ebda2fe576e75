"""Run an adaptation method over a stream of test batches and over corruption × severity views.

A *view* is a callable ``view(corruption, severity) -> (images, labels)``: a released dataset
(``repro.data.corrupted``) or corruptions computed on the fly. ``images`` is a uint8 N×C×H×W tensor or, for
sets too large to hold (ImageNet-C), a map-style Dataset of uint8 C×H×W tensors decoded in DataLoader workers.

Every view is read in one order, shuffled once from ``seed`` and shared by all methods and views (TENT:
"we control for ordering by shuffling and sharing the order across methods"), so every method adapts on
the same batches. The order matters: it decides which images share a batch, hence the batch statistics;
``seed=None`` keeps the file order, as TENT's CIFAR-10-C code does.

Settings (the protocol choices that benchmarks leave implicit, named in every row):

- ``episodic``: each method is reset before every view (corruption × severity), the TENT example's protocol;
- ``continual``: reset once, then the views in sequence (severity-major) without reset, CoTTA's protocol;
- ``mixed``: all views shuffled into one stream (reset once); each view's row is scored on its own images;
- ``label_shift``: episodic, but each view is read class by class (classes in a shuffled order, the images of
  a class in the shared order): imbalanced, time-correlated labels, SAR's "pure class order" stream. With
  ``label_gamma`` γ, RoTTA's temporally correlated stream instead: the view is cut into as many time slots as
  classes (at most 100), each class's images spread over the slots by Dirichlet(γ) proportions, and each slot
  reads its classes' chunks in a random order (γ → 0: class order; large γ: close to the shuffled order).

Methods whose prediction depends only on the current batch (``stateful`` False) run several batches in one
forward with per-batch statistics (``AdaptationMethod.grouped``); ``source`` runs once per view and its rows are
shared by every test batch size. Under ``episodic`` and ``label_shift`` a method with ``parallel_episodes``
(tent) runs the episodes of several views side by side, one forward for the current batch of each
(``AdaptationMethod.episodes``). All give the rows of the per-batch loop (``grouped=False``), the last to float
rounding. When to group, and the passes that makes, is ``repro.adapt.grouping``; the orders, ``repro.adapt.orders``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from repro.adapt import grouping
from repro.adapt.base import AdaptationMethod
from repro.adapt.grouping import (
    by_episode,
    episodes_per_forward,
    grouped_chunks,
    predicts_batches_together,
    runs_episodes_side_by_side,
)
from repro.adapt.metrics import error_row
from repro.adapt.orders import dirichlet_label_order, evaluation_order, label_shift_order
from repro.data.corrupted import CorruptionView, ImageSource
from repro.data.loaders import PixelNormalizer
from repro.errors import UserError
from repro.train.loop import autocast

ResetPolicy = Literal["per_view", "online"]
Setting = Literal["episodic", "continual", "mixed", "label_shift"]
SETTINGS: tuple[str, ...] = ("episodic", "continual", "mixed", "label_shift")
#: Views of generated (in-memory) images kept for episodes side by side: bytes at most, per flush.
EPISODE_VIEW_BYTES = 1 << 30


@dataclass
class Stream:
    """What one evaluation predicted on a stream: probabilities, labels, its cost."""

    probs: torch.Tensor
    labels: torch.Tensor
    seconds: float
    forward_images: int
    backward_images: int

    def cost(self) -> dict[str, float]:
        n = len(self.labels)
        return {"forward_per_image": self.forward_images / n, "backward_per_image": self.backward_images / n,
                "ms_per_image": 1000.0 * self.seconds / n}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_stream(method: AdaptationMethod, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    frozen: bool = False, amp: bool = False) -> Stream:
    """Softmax probabilities and labels of a stream of (normalized images, labels) batches, in stream order.

    Results stay on the device until the stream ends, so the loop never waits for it. ``frozen`` predicts
    with the method's current state without adapting (``predict_frozen``); ``amp`` runs the model under bf16
    autocast on CUDA (as training does; probabilities are computed in float32).
    """
    device_probs, targets = [], []
    forward, backward = method.forward_images, method.backward_images
    start = time.perf_counter()
    predict = method.predict_frozen if frozen else method.predict
    device = None
    for images, labels in batches:
        device = images.device
        with autocast(device, amp):
            logits = predict(images)
        device_probs.append(logits.float().softmax(1))
        targets.append(labels)
    if not device_probs:
        raise UserError("the test stream has no batches")
    synchronize(device)
    seconds = time.perf_counter() - start
    return Stream(torch.cat(device_probs).cpu(), torch.cat(targets).cpu(), seconds,
                  method.forward_images - forward, method.backward_images - backward)


def view_batches(images: ImageSource, labels: torch.Tensor, order: torch.Tensor, batch_size: int, *,
                 device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], workers: int = 0,
                 group: int = 1, channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized batches of a view on ``device`` in ``order``; a Dataset view is decoded by DataLoader workers.

    ``channels_last`` (CUDA only) gives channels-last batches, for models in that memory format.

    ``group`` > 1 yields up to ``group`` consecutive batches concatenated (the last partial batch alone).
    """
    normalize = PixelNormalizer(mean, std, device, channels_last=channels_last and device.type == "cuda")
    labels = labels.to(device)
    chunks = grouped_chunks(order.to(device), batch_size, group)
    if isinstance(images, torch.Tensor):
        images = images.to(device)  # one copy per view instead of one per batch
        uint8_batches: Iterable[torch.Tensor] = (images[index] for index in chunks)
    else:
        sampler = [index.tolist() for index in chunks]
        uint8_batches = DataLoader(images, batch_sampler=sampler, num_workers=workers,
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


class Evaluator:
    """Runs evaluations on views, reusing what cannot differ: ``source`` per view, grouped stateless batches."""

    def __init__(self, *, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], workers: int,
                 grouped: bool, clean: tuple[torch.Tensor, torch.Tensor] | None, amp: bool) -> None:
        self.device, self.mean, self.std, self.workers, self.amp = device, mean, std, workers, amp
        self.grouped = grouped
        self.clean = clean
        self.shared: dict[tuple[str, int], Stream] = {}  # batch-size-free results, by (label, view number)

    def stream(self, evaluation: Evaluation, images: ImageSource, labels: torch.Tensor, order: torch.Tensor,
               key: tuple[str, int]) -> Stream:
        method = evaluation.method
        if self.grouped and method.batch_independent and (evaluation.label, key[1]) in self.shared:
            return self.shared[evaluation.label, key[1]]
        groupable = predicts_batches_together(method, evaluation.batch_size, self.device.type)
        group = grouping.GROUPED_IMAGES // evaluation.batch_size if self.grouped and groupable else 1
        batches = view_batches(images, labels, order, evaluation.batch_size, device=self.device, mean=self.mean,
                               std=self.std, workers=self.workers, group=max(group, 1), channels_last=self.amp)
        if group > 1:
            with method.grouped(evaluation.batch_size):
                result = evaluate_stream(method, batches, amp=self.amp)
        else:
            result = evaluate_stream(method, batches, amp=self.amp)
        if method.batch_independent:
            self.shared[evaluation.label, key[1]] = result
        return result

    def runs_episodes_together(self, evaluation: Evaluation, setting: str) -> bool:
        """Whether ``evaluation`` (reset per view) runs its views' episodes side by side
        (``runs_episodes_side_by_side``)."""
        method = evaluation.method
        return (self.grouped and evaluation.reset == "per_view"
                and runs_episodes_side_by_side(method, getattr(method, "episodic", False), setting,
                                               evaluation.batch_size, self.device.type))

    def episode_streams(self, evaluation: Evaluation, parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                        ) -> list[tuple[Stream, dict[str, float]]]:
        """One stream per (uint8 images, labels, order) view, their episodes run side by side in one forward, and
        each episode's clean error after its view (``clean_error_after``, for every episode in one forward too).

        Each step stacks every view's current batch (its own order), so the views must have equal lengths; the
        cost of the shared forwards is split evenly between them.
        """
        count = len(parts)
        images = torch.stack([part[0] for part in parts]).to(self.device)  # E × N × C × H × W
        labels = torch.stack([part[1] for part in parts]).to(self.device)
        orders = torch.stack([part[2] for part in parts]).to(self.device)
        normalize = PixelNormalizer(self.mean, self.std, self.device,
                                    channels_last=self.amp and self.device.type == "cuda")
        episode = torch.arange(count, device=self.device)[:, None]
        steps = orders.split(evaluation.batch_size, dim=1)
        batches = ((normalize(images[episode, index].flatten(0, 1)), labels[episode, index].flatten())
                   for index in steps)
        with evaluation.method.episodes(count):
            whole = evaluate_stream(evaluation.method, batches, amp=self.amp)
            clean_errors = self.clean_errors_after_episodes(evaluation, count)
        probs, targets = (by_episode(values, [index.shape[1] for index in steps], count)
                          for values in (whole.probs, whole.labels))
        streams = [Stream(probs[e], targets[e], whole.seconds / count, whole.forward_images // count,
                          whole.backward_images // count) for e in range(count)]
        return [(stream, {} if clean_errors is None else {"clean_error_after": clean_errors[e]})
                for e, stream in enumerate(streams)]

    def clean_errors_after_episodes(self, evaluation: Evaluation, count: int) -> list[float] | None:
        """``clean_error_after`` of each of ``count`` episodes side by side: every clean batch given to all."""
        if self.clean is None:
            return None
        images, labels = self.clean
        batches = view_batches(images, labels, torch.arange(len(labels)), evaluation.batch_size, device=self.device,
                               mean=self.mean, std=self.std, channels_last=self.amp)
        sizes = []

        def repeated() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch, batch_labels in batches:
                sizes.append(len(batch_labels))
                yield batch.repeat(count, *(1,) * (batch.ndim - 1)), batch_labels.repeat(count)

        result = evaluate_stream(evaluation.method, repeated(), frozen=True, amp=self.amp)
        probs, targets = (by_episode(values, sizes, count) for values in (result.probs, result.labels))
        return [100.0 * error for error in (probs.argmax(2) != targets).float().mean(1).tolist()]  # as one alone

    def clean_error_after(self, evaluation: Evaluation) -> dict[str, float]:
        """The clean error (%) of a stateful method's current state, predicted without adapting further."""
        if self.clean is None or not evaluation.method.stateful:
            return {}
        images, labels = self.clean
        batches = view_batches(images, labels, torch.arange(len(labels)), evaluation.batch_size, device=self.device,
                               mean=self.mean, std=self.std, channels_last=self.amp)
        result = evaluate_stream(evaluation.method, batches, frozen=True, amp=self.amp)
        return {"clean_error_after": 100.0 * (result.probs.argmax(1) != result.labels).float().mean().item()}


def row(evaluation: Evaluation, corruption: str, severity: int, result: Stream, setting: str,
        extra: dict[str, float]) -> dict[str, object]:
    return {**error_row(evaluation.label, corruption, severity, evaluation.batch_size, result.probs, result.labels,
                        evaluation.method.adapts), "setting": setting, **result.cost(), **extra}


def evaluate_views(evaluations: Sequence[Evaluation], view: CorruptionView, views: Sequence[tuple[str, int]], *,
                   mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu",
                   seed: int | None = 0, workers: int = 0, setting: Setting = "episodic",
                   clean: tuple[torch.Tensor, torch.Tensor] | None = None, grouped: bool = True,
                   amp: bool = False, label_gamma: float | None = None) -> list[dict[str, object]]:
    """Evaluate every evaluation on every (corruption, severity) view, in the given order; one row per pair.

    Each view is read once and fed to all evaluations (a generated view costs more than evaluating it), in
    the order of ``evaluation_order(n, seed)``. Every method is reset when this starts; under ``episodic`` and
    ``label_shift``, ``"per_view"`` evaluations are reset again before each view (``"online"`` ones carry their
    adaptation on); ``continual`` never resets; ``mixed`` evaluates one stream of all views. ``mean`` and
    ``std`` are per-channel, in [0, 1] units, as ``ImageDataset.mean/std``. With ``clean`` (uint8 images,
    labels), a stateful method's row also has ``clean_error_after``: its clean error after the view, predicted
    without adapting further (the forgetting EATA measures). ``label_gamma`` makes ``label_shift`` RoTTA's
    Dirichlet stream. ``amp`` runs the models channels-last under bf16
    autocast on CUDA, as training does (off by default: it changes the numbers slightly).
    """
    if setting not in SETTINGS:
        raise UserError(f"setting {setting!r}; allowed: {', '.join(SETTINGS)}")
    device = torch.device(device)
    for evaluation in evaluations:
        evaluation.method.to(device)
        if amp and device.type == "cuda":
            evaluation.method.model.to(memory_format=torch.channels_last)
    evaluator = Evaluator(device=device, mean=mean, std=std, workers=workers, grouped=grouped, clean=clean, amp=amp)
    if setting == "mixed":
        return evaluate_mixed(evaluations, view, views, evaluator, seed)
    together = [evaluator.runs_episodes_together(evaluation, setting) for evaluation in evaluations]
    rows: dict[tuple[int, int], dict[str, object]] = {}  # by (view number, evaluation number): the loop's order
    kept: list[tuple[int, str, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # views for episodes together

    def run_kept_episodes() -> None:
        for number, evaluation in enumerate(evaluations):
            if not together[number]:
                continue
            per_forward = episodes_per_forward(evaluation.batch_size)
            for block in [kept[i:i + per_forward] for i in range(0, len(kept), per_forward)]:
                streams = evaluator.episode_streams(evaluation, [view_part[3:] for view_part in block])
                for (view_number, corruption, severity, *_), (result, extra) in zip(block, streams, strict=True):
                    rows[view_number, number] = row(evaluation, corruption, severity, result, setting, extra)
        kept.clear()

    for view_number, (corruption, severity) in enumerate(views):
        images, labels = checked_view(view, corruption, severity)
        order = evaluation_order(len(labels), seed)
        if setting == "label_shift":
            order = (label_shift_order(order, labels, seed) if label_gamma is None
                     else dirichlet_label_order(order, labels, label_gamma, seed))
        keep = any(together) and isinstance(images, torch.Tensor)
        if keep and kept and (len(labels) != len(kept[0][4])
                              or images.nbytes * (len(kept) + 1) > EPISODE_VIEW_BYTES):
            run_kept_episodes()
        for number, evaluation in enumerate(evaluations):
            if keep and together[number]:
                continue
            if evaluation.reset == "per_view" and setting != "continual":
                evaluation.method.reset()
            result = evaluator.stream(evaluation, images, labels, order, (corruption, view_number))
            rows[view_number, number] = row(evaluation, corruption, severity, result, setting,
                                            evaluator.clean_error_after(evaluation))
        if keep:
            kept.append((view_number, corruption, severity, images, labels, order))
    run_kept_episodes()
    return [rows[key] for key in sorted(rows)]


def checked_view(view: CorruptionView, corruption: str, severity: int) -> tuple[ImageSource, torch.Tensor]:
    images, labels = view(corruption, severity)
    if len(images) != len(labels):
        raise UserError(f"{corruption} severity {severity}: {len(images)} images but {len(labels)} labels")
    return images, labels


def evaluate_mixed(evaluations: Sequence[Evaluation], view: CorruptionView, views: Sequence[tuple[str, int]],
                   evaluator: Evaluator, seed: int | None) -> list[dict[str, object]]:
    """One shuffled stream of every view's images; each view's row scores the predictions on its images."""
    parts = [checked_view(view, corruption, severity) for corruption, severity in views]
    sizes = [len(labels) for _, labels in parts]
    labels = torch.cat([part_labels for _, part_labels in parts])
    images: ImageSource
    if all(isinstance(part, torch.Tensor) for part, _ in parts):
        images = torch.cat([part for part, _ in parts])
    else:
        images = ConcatDataset([part if isinstance(part, Dataset) else TensorImages(part) for part, _ in parts])
    order = evaluation_order(len(labels), seed)
    origin = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(sizes))[order]
    rows = []
    for evaluation in evaluations:
        result = evaluator.stream(evaluation, images, labels, order, ("mixed", -1))
        extra = evaluator.clean_error_after(evaluation)
        for number, (corruption, severity) in enumerate(views):
            mine = origin == number
            part = Stream(result.probs[mine], result.labels[mine], result.seconds * sizes[number] / len(labels),
                          round(result.forward_images * sizes[number] / len(labels)),
                          round(result.backward_images * sizes[number] / len(labels)))
            rows.append(row(evaluation, corruption, severity, part, "mixed", extra))
    return rows


class TensorImages(Dataset):
    """A uint8 N×C×H×W tensor as a map-style dataset, to join Dataset views in one mixed stream."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def evaluate_corruptions(method: AdaptationMethod, view: CorruptionView, corruptions: Sequence[str],
                         severities: Sequence[int], *, mean: tuple[float, ...], std: tuple[float, ...],
                         batch_size: int, device: torch.device | str = "cpu", seed: int | None = 0,
                         reset: ResetPolicy = "per_view", workers: int = 0, grouped: bool = True
                         ) -> list[dict[str, object]]:
    """Evaluate ``method`` on every (corruption, severity) view; one tidy result row per view.

    Views run severity-major (for each severity, every corruption), the official TENT example's loop.
    ``reset="per_view"`` restores the method before each view (the TENT example); ``"online"`` resets once at
    the start and lets the adaptation carry over from view to view, in that order.
    """
    views = [(corruption, severity) for severity in severities for corruption in corruptions]
    return evaluate_views([Evaluation(method, batch_size, method.name, reset)], view, views, mean=mean, std=std,
                          device=device, seed=seed, workers=workers, grouped=grouped)
