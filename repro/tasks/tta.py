"""The ``tta`` task: one model, evaluated with several test-time adaptation methods on corrupted test sets.

One run is one model (trained with the suite's recipe through the checkpoint cache, or the pretrained weights
the suite names), so a sweep over methods × test batch sizes never trains twice: those are rows of the run.
The corrupted images are generated on the fly from the loaded test split (``data: generated``) or read from
the released files (``data: released``: CIFAR-10/100-C ``.npy``, the ImageNet-C tree); both give the same rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from repro.adapt import ADAPTATION_METHODS, create_method
from repro.adapt.evaluate import Evaluation, Setting, evaluate_views
from repro.adapt.grouping import evaluation_passes
from repro.adapt.metrics import BENCHMARK_CORRUPTIONS, SEVERITIES, mce, mean_error
from repro.corruptions import CORRUPTION_REGISTRY
from repro.data import ImageDataset, TensorSplit, cache_root
from repro.data.base import resolve_data_dir
from repro.data.corrupted import (
    CorruptionView,
    GeneratedView,
    cifar_c_view,
    imagenet_c_view,
    in_memory,
    subset_view,
)
from repro.data.loaders import PixelNormalizer, decode_folder
from repro.errors import UserError
from repro.tasks.base import RunContext, RunOutcome, RunSpec, Task, build_run_model, register_task, train_or_load
from repro.tasks.config import RunConfig
from repro.tasks.workload import Workload, split_sizes, training_workload

#: datasets whose released corrupted copy has a loader (CIFAR-10-C, CIFAR-100-C, ImageNet-C)
RELEASED = ("cifar10", "cifar100", "imagenet")
GROUP = ("method", "batch_size")
CALIBRATION = ("ece", "nll", "brier")
COSTS = ("forward_per_image", "backward_per_image", "ms_per_image", "clean_error_after")


class MethodSpec(BaseModel):
    """An adaptation method by registered name, with its options and the label its rows get."""

    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    batch_sizes: list[int] | None = Field(default=None, description="test batch sizes; None: the task's")

    @property
    def column(self) -> str:
        return self.label or self.name

    @model_validator(mode="after")
    def _known(self) -> MethodSpec:
        if self.name not in ADAPTATION_METHODS:
            raise ValueError(f"unknown adaptation method {self.name!r}; allowed: {', '.join(ADAPTATION_METHODS)}")
        try:  # wrapping an empty model checks the option names and values exactly as a run will
            create_method(self.name, nn.Sequential(), **self.options)
        except UserError as err:
            raise ValueError(str(err)) from None
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise ValueError(f"method {self.column}: batch_sizes must be a non-empty list of sizes >= 1")
        return self


class TTAOptions(BaseModel):
    """What a ``tta`` run evaluates. Every view has the same images, read in one shuffled order."""

    model_config = ConfigDict(extra="forbid")
    methods: list[MethodSpec] = Field(min_length=1)
    corruptions: list[str] = Field(default_factory=lambda: list(BENCHMARK_CORRUPTIONS), min_length=1)
    severities: list[int] = Field(default_factory=lambda: list(SEVERITIES), min_length=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [64], min_length=1)
    images: int | None = Field(default=None, ge=1, description="images per view; None: the test split's")
    clean: bool = Field(default=True, description="also evaluate every method on the clean test images")
    data: Literal["generated", "released"] = "generated"
    released_root: str | None = Field(default=None, description="the released files; relative to --data-dir")
    corruption_seed: int = 0
    order_seed: int | None = Field(default=0, description="evaluation order; None keeps the file order")
    cache: bool = Field(default=False, description="keep generated views in $REPRO_CACHE_DIR/corrupted")
    workers: int = Field(default=4, ge=0, description="decoding workers for image folders")
    setting: Setting = Field(default="episodic", description="episodic, continual, mixed or label_shift "
                             "(repro.adapt.evaluate)")
    label_gamma: float | None = Field(default=None, gt=0, description="label_shift: RoTTA's Dirichlet γ for "
                                      "time-correlated labels; None: pure class order (SAR's)")
    amp: bool = Field(default=False, description="bf16 autocast and channels-last on CUDA, as training; off keeps "
                      "float32 (ignored on CPU)")
    clean_after_images: int = Field(default=2000, ge=0, description="clean images for the clean error of stateful "
                                    "methods after each view (forgetting); 0: not measured")

    @field_validator("corruptions")
    @classmethod
    def _corruptions(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in CORRUPTION_REGISTRY]
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}; allowed: {', '.join(CORRUPTION_REGISTRY)}")
        return names

    @field_validator("severities")
    @classmethod
    def _severities(cls, values: list[int]) -> list[int]:
        if not set(values) <= set(SEVERITIES):
            raise ValueError(f"severities {values}; allowed: 1, 2, 3, 4, 5")
        return values

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, values: list[int]) -> list[int]:
        if min(values) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {values}")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TTAOptions:
        labels = [m.column for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError("two methods share a label; give them distinct `label`s")
        if self.data == "released" and not self.released_root:
            raise ValueError("data: released needs released_root (the CIFAR-10-C folder or the ImageNet-C tree)")
        return self


def corrupted_views(options: TTAOptions) -> list[tuple[str, int]]:
    """The (corruption, severity) views a run evaluates, severity by severity: what it runs and what its rows name."""
    return [(c, s) for s in options.severities for c in options.corruptions]


def in_memory_split(data: ImageDataset, workers: int) -> TensorSplit:
    """The clean test split as uint8 tensors (an image folder decoded once: resize, center crop)."""
    test = data.test
    return test if isinstance(test, TensorSplit) else TensorSplit(decode_folder(test, workers), test.labels)


def released_view(options: TTAOptions, data: ImageDataset, ctx: RunContext) -> CorruptionView:
    root = Path(options.released_root)
    data_dir = resolve_data_dir(ctx.data_dir)
    if not root.is_absolute() and data_dir is not None:
        root = data_dir / root
    if data.name not in RELEASED:
        raise UserError(f"task option data: released: no released corrupted copy of {data.name!r} is supported; "
                        f"allowed datasets: {', '.join(RELEASED)} (or data: generated)")
    if data.name != "imagenet":
        return cifar_c_view(root)
    return in_memory(imagenet_c_view(root, classes=data.class_names or None), options.workers)


def forgetting_set(clean: TensorSplit, images: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``images`` clean test images, on which stateful methods are scored after each view."""
    if images == 0:
        return None
    subset = clean.subset(min(images, len(clean.labels)))
    return subset.images, subset.labels


def summary_rows(rows: list[dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """Per method and batch size: mean error over all cells, at severity 5, and mCE where AlexNet's errors apply.

    mCE is ImageNet-C's (AlexNet-normalized, all 15 benchmark corruptions at 5 severities); elsewhere the plain
    average is the summary, as CIFAR-10-C and Fashion-MNIST-C have no reference model.
    """
    frame = pd.DataFrame(rows)
    summaries = {f"mean_{metric}": mean_error(frame, group=GROUP, metric=metric) for metric in CALIBRATION}
    summaries["mean_error"] = mean_error(frame, group=GROUP)
    if 5 in set(frame["severity"]):
        summaries["mean_error_s5"] = mean_error(frame, severities=(5,), group=GROUP)
    complete = set(BENCHMARK_CORRUPTIONS) <= set(frame["corruption"]) and set(SEVERITIES) <= set(frame["severity"])
    if dataset == "imagenet" and complete:
        summaries["mce"] = mce(frame, group=GROUP)
    adapted = frame.groupby(list(GROUP))["adapted"].all()
    costs = [c for c in COSTS if c in frame.columns]
    table = pd.DataFrame(summaries).join(adapted).join(frame.groupby(list(GROUP))[costs].mean()).reset_index()
    setting = {"setting": frame["setting"].iloc[0]} if "setting" in frame.columns else {}
    return [{"corruption": "all", "severity": None, **setting, **row} for row in table.to_dict("records")]


@register_task("tta")
class TTATask(Task):
    """Train (or load) one model, then evaluate adaptation methods × test batch sizes on corrupted views.

    Rows: one per method × batch size × view (``corruption``, ``severity``, ``error`` in %, ``ece`` in %,
    ``nll``, ``brier``, ``n``, ``adapted``, the cost ``forward_per_image``, ``backward_per_image``,
    ``ms_per_image``, and for stateful methods ``clean_error_after``), the clean test set as corruption ``clean``
    at severity 0, and a summary per method × batch size as corruption ``all`` (``mean_error``,
    ``mean_error_s5``, ``mce``, ``mean_ece``, ``mean_nll``, ``mean_brier`` and the mean costs). Methods with
    nothing to adapt (a model without BatchNorm) fall back to ``source`` with ``adapted`` False, as
    ``repro.adapt`` documents. The record's ``extra`` names the protocol: setting, images per view, severity
    order, and that the metric is an error (lower is better).
    """

    Options = TTAOptions
    extra_columns = ("method", "setting", "corruption", "severity", "batch_size")
    table_metrics = ("error", "mean_error", "mean_error_s5", "mce", "ece", "mean_ece", "mean_nll", "mean_brier",
                     "clean_error_after", "forward_per_image", "backward_per_image", "ms_per_image")

    @classmethod
    def workload(cls, config: RunConfig, model_cached: bool = False, device_type: str = "cuda") -> Workload:
        """Every view through every method × batch size (``source`` once: its predictions ignore the batch);
        methods that take gradient steps also go backward, and stateful ones score the clean images after each
        view. Passes as the evaluator makes them (``evaluation_passes``)."""
        options: TTAOptions = config.task_options
        _, test_images = split_sizes(config.dataset)
        per_view = min(options.images or test_images, test_images)
        corrupted = len(options.corruptions) * len(options.severities)
        clean_after = min(options.clean_after_images, test_images) if options.setting != "mixed" else 0
        stepped = forward = passes = 0
        for spec in options.methods:
            method = ADAPTATION_METHODS.get(spec.name)
            batch_sizes = spec.batch_sizes or options.batch_sizes
            for batch_size in batch_sizes[:1] if method.batch_independent else batch_sizes:
                images = (corrupted + options.clean) * per_view
                if method.forward_only:
                    forward += images
                else:
                    stepped += images
                forward += corrupted * clean_after if method.stateful else 0
                passes += evaluation_passes(method, spec.options, batch_size, per_view, corrupted, options.setting,
                                            clean_after, device_type)
                passes += evaluation_passes(method, spec.options, batch_size, per_view, 1, "episodic", 0,
                                            device_type) if options.clean else 0
        own = Workload(stepped, forward, passes)
        if model_cached or config.model.pretrained:
            return own
        return own + training_workload(config, device_type)

    @classmethod
    def row_identities(cls, config: RunConfig) -> list[dict[str, Any]]:
        """Per method × batch size: each view, the clean images (``clean``, severity 0) when evaluated, and the
        summary (``all``, no severity)."""
        options: TTAOptions = config.task_options
        views = [*corrupted_views(options), *[("clean", 0)] * options.clean, ("all", None)]
        return [{"method": spec.column, "setting": options.setting, "corruption": corruption, "severity": severity,
                 "batch_size": batch_size}
                for spec in options.methods for batch_size in spec.batch_sizes or options.batch_sizes
                for corruption, severity in views]

    def run(self, run: RunSpec, ctx: RunContext) -> RunOutcome:
        options: TTAOptions = run.typed_config.task_options
        start = time.perf_counter()
        training_extra: dict[str, object] = {}
        if run.typed_config.model.pretrained:
            data = ctx.dataset(run.typed_config.dataset)
            model, metrics = build_run_model(run, data).to(ctx.device), {}
        else:
            trained = train_or_load(run, ctx)
            if trained.status != "ok":
                diverged = trained.result.diverged_step if trained.result else None
                return RunOutcome(trained.status, trained.metrics, time.perf_counter() - start,
                                  diverged_step=diverged)
            data, model, metrics = trained.data, trained.model, dict(trained.metrics)
            training_extra = trained.training_extra
        model.eval()
        clean = in_memory_split(data, options.workers).subset(options.images)
        if options.data == "released":
            images = options.images or run.typed_config.dataset.test_subset
            view = subset_view(released_view(options, data, ctx), images)
            generated = None
        else:
            cache = cache_root() / "corrupted" if options.cache else None
            view = generated = GeneratedView(clean, seed=options.corruption_seed, device=ctx.device, cache_dir=cache)
        evaluations = [Evaluation(create_method(spec.name, model, **spec.options), batch_size, spec.column)
                       for spec in options.methods for batch_size in spec.batch_sizes or options.batch_sizes]
        common = {"mean": data.mean, "std": data.std, "device": ctx.device, "seed": options.order_seed,
                  "amp": options.amp}
        normalize = PixelNormalizer(data.mean, data.std, torch.device(ctx.device), channels_last=False)
        for evaluation in evaluations:  # EATA's Fisher information, on clean images in batches of 64 (its code's)
            evaluation.method.to(ctx.device).calibrate(
                normalize(clean.images[start : start + 64].to(ctx.device)) for start in range(0, len(clean.labels), 64))
        rows = evaluate_views(evaluations, lambda *_: (clean.images, clean.labels), [("clean", 0)], **common
                              ) if options.clean else []
        views = corrupted_views(options)
        corrupted = evaluate_views(evaluations, view, views, **common, workers=options.workers,
                                   setting=options.setting, label_gamma=options.label_gamma,
                                   clean=forgetting_set(clean, options.clean_after_images))
        rows += corrupted + summary_rows(corrupted, data.name)
        extra = {**training_extra, "evaluations": len(evaluations), "views": len(views), "setting": options.setting,
                 "label_gamma": options.label_gamma,
                 "images_per_view": int(corrupted[0]["n"]), "severity_order": list(options.severities),
                 "metric_direction": "error in % (lower is better), not accuracy"}
        if generated is not None and generated.seconds > 0:
            extra["corruption_images_per_s"] = generated.images / generated.seconds
        wall = time.perf_counter() - start
        return RunOutcome("ok", metrics, wall, rows=rows, extra=extra)
