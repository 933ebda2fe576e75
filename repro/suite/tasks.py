"""What a run does: one registry of tasks. ``train`` trains and evaluates one configuration.

Other tasks (test-time adaptation, quantization, memory measurement) register here the same way: a class with
an ``Options`` model (validated from the suite's ``task_options``) and a ``run`` method returning the fields
of the run record.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from repro.data import ImageDataset, load_dataset
from repro.errors import UserError
from repro.models import build_model
from repro.registry import Registry
from repro.train import TrainConfig, TrainResult, seed_everything, train_and_evaluate
from repro.train.distributed import DataParallel
from repro.train.timing import measure_step_time


@dataclass
class RunSpec:
    """One expanded configuration of a suite."""

    suite: str
    suite_version: int
    tier: str
    run_id: str
    config: dict[str, Any]
    setting: dict[str, Any]
    #: the run id of an earlier run of the expansion whose numbers this one shares (``Normalizer.invariant_to``)
    shared_with: str | None = None

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.setting.items())


@dataclass
class RunContext:
    """What a task needs besides its configuration: device, data location, where checkpoints go.

    ``data_parallel`` is set when ``repro run --nproc N`` started this process under torchrun.
    """

    device: torch.device
    results_dir: Path
    data_dir: Path | None = None
    progress: bool = True
    data_parallel: DataParallel | None = None
    _datasets: dict[str, ImageDataset] = field(default_factory=dict)

    def dataset(self, spec: dict[str, Any]) -> ImageDataset:
        """Load (once per process) the dataset a run's config names, cut to the tier's subsets."""
        key = repr(sorted(spec.items()))
        if key not in self._datasets:
            revision = {"revision": spec["revision"]} if spec.get("revision") else {}
            data = load_dataset(spec["name"], data_dir=self.data_dir, source=spec["source"],
                                generated=spec["generated"], **revision)
            self._datasets[key] = data.subset(spec["train_subset"], spec["test_subset"])
        return self._datasets[key]

    def checkpoint_path(self, run: RunSpec) -> Path:
        """Where the run's trained weights are kept, keyed by what determines them, not by the suite.

        Two suites that train the same model (same data, backbone, normalizer, recipe and seed) share the
        checkpoint: ``qbn-fmnist`` converts the BN models ``fmnist-normalizers`` trained.
        """
        return self.results_dir / "checkpoints" / f"{model_key(run.config)}.pt"


@dataclass
class RunOutcome:
    status: str
    metrics: dict[str, Any]
    wall_time_s: float
    images_per_s: float | None = None
    peak_memory_mb: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    diverged_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task:
    """Base class of a run kind.

    ``extra_columns`` are setting columns its table rows add; ``table_metrics`` the metrics its markdown
    table shows (the CSV keeps every metric).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    extra_columns: ClassVar[tuple[str, ...]] = ()
    table_metrics: ClassVar[tuple[str, ...]] = ()

    def run(self, run: RunSpec, ctx: RunContext) -> RunOutcome:
        raise NotImplementedError

    def shared_outcome(self, run: RunSpec, primary: dict[str, Any], ctx: RunContext) -> RunOutcome:
        """``run``'s outcome taken from the record of the run it shares (``RunSpec.shared_with``): the same numbers.

        A task re-measures here whatever depends on the run's own configuration although the numbers do not.
        """
        return RunOutcome(primary["status"], dict(primary["metrics"]), primary["wall_time_s"],
                          primary.get("images_per_s"), primary.get("peak_memory_mb"),
                          list(primary.get("curve") or []), list(primary.get("rows") or []),
                          primary.get("diverged_step"), dict(primary.get("extra") or {}))


TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a Task subclass under ``name``."""
    return TASKS.register_named(name)


def build_run_model(run: RunSpec, data: ImageDataset) -> torch.nn.Module:
    """The run's model, seeded so that the initial weights depend on the run's seed only."""
    config = run.config
    seed_everything(config["seed"])
    return build_model(
        config["backbone"], config["normalizer"]["name"], num_classes=data.num_classes, in_chans=data.in_chans,
        small_input=config["model"]["small_input"], pretrained=config["model"]["pretrained"],
        **config["normalizer"]["options"],
    )


def model_key(config: dict[str, Any]) -> str:
    """Hash of the parts of a run's config that determine its trained weights."""
    parts = {key: config[key] for key in ("dataset", "backbone", "model", "train", "seed")}
    parts["normalizer"] = {"name": config["normalizer"]["name"], "options": config["normalizer"]["options"]}
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class TrainedModel:
    """A trained model and the training metrics, either just trained or loaded from the checkpoint cache."""

    model: torch.nn.Module
    data: ImageDataset
    status: str
    metrics: dict[str, Any]
    from_checkpoint: bool
    result: TrainResult | None = None


def save_checkpoint(model: torch.nn.Module, metrics: dict[str, Any], run: RunSpec, ctx: RunContext,
                    result: TrainResult | None = None) -> Path:
    """Write the weights and training metrics atomically (a killed run never leaves a truncated checkpoint).

    With the ``result`` of the training (curve, timings) a ``train`` run of another suite with the same recipe
    can report it instead of training again.
    """
    path = ctx.checkpoint_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": state, "metrics": metrics, "model_key": model_key(run.config)}
    if result is not None:
        payload["result"] = {"curve": result.curve, "wall_time_s": result.wall_time_s,
                             "images_per_s": result.images_per_s, "peak_memory_mb": result.peak_memory_mb}
        payload["suite"] = run.suite
    torch.save(payload, partial)
    partial.replace(path)
    return path


def train_or_load(run: RunSpec, ctx: RunContext, *, save: bool = True) -> TrainedModel:
    """The run's model trained with its recipe: loaded when a checkpoint of the same training exists.

    Tasks that evaluate trained models (quantization, test-time adaptation) call this, so a model is trained
    once however many suites and tasks use it. Diverged models are returned but never saved.
    """
    data = ctx.dataset(run.config["dataset"])
    model = build_run_model(run, data)
    path = ctx.checkpoint_path(run)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return TrainedModel(model.to(ctx.device), data, "ok", saved["metrics"], from_checkpoint=True)
    cfg = TrainConfig.model_validate(run.config["train"])
    result = train_and_evaluate(model, data, cfg, device=ctx.device, seed=run.config["seed"], progress=ctx.progress,
                                description=run.label)
    if save and result.status == "ok":
        save_checkpoint(model, result.metrics, run, ctx)
    return TrainedModel(model, data, result.status, result.metrics, from_checkpoint=False, result=result)


def step_time_against_bn(run: RunSpec, model: torch.nn.Module, data: ImageDataset, cfg: TrainConfig,
                         device: torch.device) -> dict[str, float]:
    """Median time of a training step on one micro-batch: the trained model (a copy, past any burn-in, so CBN
    times its cross-iteration path) and a freshly built BN model of the same backbone.

    On CPU the process's CPU time is used: on a shared machine it is far steadier than wall time.
    """
    shape = {"batch_size": cfg.micro_batch or cfg.batch_size, "image_size": data.train.image_size,
             "in_chans": data.in_chans, "num_classes": data.num_classes, "device": device}
    bn_twin = build_model(run.config["backbone"], "bn", num_classes=data.num_classes, in_chans=data.in_chans,
                          small_input=run.config["model"]["small_input"])
    timings = [measure_step_time(m, **shape) for m in (copy.deepcopy(model), bn_twin)]
    step_ms, bn_step_ms = (t.median_ms if device.type == "cuda" else t.median_cpu_ms for t in timings)
    return {"micro_step_ms": step_ms, "bn_micro_step_ms": bn_step_ms, "step_time_vs_bn": step_ms / bn_step_ms}


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    save_checkpoint: bool = False
    sync_batchnorm: bool = False
    #: also time the trained model's step next to a BN twin's, back to back on this machine (normalizer cost)
    step_time_vs_bn: bool = False


@register_task("train")
class TrainTask(Task):
    """Train from scratch and evaluate top-1 and loss on the test split after every epoch.

    Under ``repro run --nproc N`` each process trains on its slice of every batch (see repro.train.distributed),
    optionally with synchronized BatchNorm; only rank 0 saves the checkpoint.
    """

    Options = TrainOptions
    table_metrics = ("top1", "best_top1", "loss", "step_time_ms", "step_time_vs_bn", "images_per_s", "peak_memory_mb")

    def run(self, run: RunSpec, ctx: RunContext) -> RunOutcome:
        options = TrainOptions.model_validate(run.config["task_options"])
        data_parallel = ctx.data_parallel
        if options.sync_batchnorm:
            if data_parallel is None:
                raise UserError(f"suite {run.suite}: task_options.sync_batchnorm needs data-parallel processes "
                                "(repro run --nproc N)")
            data_parallel = dataclasses.replace(data_parallel, sync_batchnorm=True)
        data = ctx.dataset(run.config["dataset"])
        model = build_run_model(run, data)
        cfg = TrainConfig.model_validate(run.config["train"])
        is_main = data_parallel is None or data_parallel.is_main
        path = ctx.checkpoint_path(run)
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        if "result" in saved and saved["suite"] != run.suite:  # another suite's same training: not repeated
            model.load_state_dict(saved["state_dict"])
            model.to(ctx.device)
            result = TrainResult("ok", dict(saved["metrics"]), **saved["result"],
                                 extra={"from_checkpoint": saved["model_key"]})
        else:
            result = train_and_evaluate(model, data, cfg, device=ctx.device, seed=run.config["seed"],
                                        progress=ctx.progress, description=run.label, data_parallel=data_parallel)
            if options.save_checkpoint and result.status == "ok" and is_main:
                save_checkpoint(model, result.metrics, run, ctx, result)
        if options.step_time_vs_bn and result.status == "ok" and is_main:
            result.metrics.update(step_time_against_bn(run, model, data, cfg, ctx.device))
        return RunOutcome(result.status, result.metrics, result.wall_time_s, result.images_per_s,
                          result.peak_memory_mb, result.curve, diverged_step=result.diverged_step, extra=result.extra)

    def shared_outcome(self, run: RunSpec, primary: dict[str, Any], ctx: RunContext) -> RunOutcome:
        """The shared numbers; the step time on one micro-batch is timed at this run's micro-batch (on a fresh
        model: the normalizers that share runs keep no training state that changes a step's cost)."""
        outcome = super().shared_outcome(run, primary, ctx)
        options = TrainOptions.model_validate(run.config["task_options"])
        if options.step_time_vs_bn and outcome.status == "ok":
            data = ctx.dataset(run.config["dataset"])
            cfg = TrainConfig.model_validate(run.config["train"])
            outcome.metrics.update(step_time_against_bn(run, build_run_model(run, data), data, cfg, ctx.device))
        return outcome
