"""What a run does: one registry of tasks, the run's spec and context, and the trained-model cache tasks share.

A task (``train``, ``tta``, ``quantize``, ``memory``: one module each in this package) registers here: a class
with an ``Options`` model (validated from the suite's ``task_options``) and a ``run`` method returning the fields
of the run record.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from repro.data import ImageDataset, load_dataset
from repro.models import build_model
from repro.registry import Registry
from repro.store.atomic import atomic_path, move_aside
from repro.tasks.config import DatasetSpec, RunConfig
from repro.tasks.workload import Workload, training_workload
from repro.train import TrainResult, seed_everything, train_and_evaluate
from repro.train.distributed import DataParallel
from repro.train.resume import ResumePolicy


@dataclass
class RunSpec:
    """One expanded configuration of a suite."""

    suite: str
    suite_version: int
    tier: str
    run_id: str
    #: the resolved configuration as records store it and run ids hash it
    config: dict[str, Any]
    setting: dict[str, Any]
    #: the same configuration, typed and validated at expansion: what a task reads
    typed_config: RunConfig
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
    #: ``clock()`` value by which training stops, with a resumable checkpoint (a campaign's budget); None: never
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic
    #: seconds between resumable training states (``repro.train.resume``); None: only at a deadline
    checkpoint_every_s: float | None = None
    #: ``repro run --force``: train again even when a checkpoint of the same training exists
    retrain: bool = False
    #: runs that the executor runs side by side on this run's device (``--workers``); their wall times are shares
    runs_sharing_device: int = 1
    _datasets: dict[str, ImageDataset] = field(default_factory=dict)
    _fingerprints: dict[str, str] = field(default_factory=dict)

    def dataset(self, spec: DatasetSpec) -> ImageDataset:
        """Load (once per process) the dataset a run's config names, cut to the tier's subsets."""
        key = repr(sorted(spec.model_dump().items()))
        if key not in self._datasets:
            revision = {"revision": spec.revision} if spec.revision else {}
            data = load_dataset(spec.name, data_dir=self.data_dir, source=spec.source, generated=spec.generated,
                                **revision)
            self._datasets[key] = data.subset(spec.train_subset, spec.test_subset)
        return self._datasets[key]

    def data_fingerprint(self, spec: DatasetSpec) -> str:
        """Hash of the images and labels a run's config loads (once per process and dataset)."""
        key = repr(sorted(spec.model_dump().items()))
        if key not in self._fingerprints:
            self._fingerprints[key] = self.dataset(spec).fingerprint()
        return self._fingerprints[key]

    def checkpoint_path(self, run: RunSpec) -> Path:
        """Where the run's trained weights are kept, keyed by what determines them, not by the suite.

        Two suites that train the same model (same data, backbone, normalizer, recipe and seed) share the
        checkpoint: ``qbn-fmnist`` converts the BN models ``fmnist-normalizers`` trained.
        """
        return self.results_dir / "checkpoints" / f"{model_key(run.config)}.pt"

    def resume_policy(self, run: RunSpec) -> ResumePolicy:
        """Training state of an unfinished run, next to the finished checkpoints and keyed the same way."""
        path = self.results_dir / "checkpoints" / f"{model_key(run.config)}.resume.pt"
        if self.retrain:  # --force: train from the start
            path.unlink(missing_ok=True)
        return ResumePolicy(path, self.checkpoint_every_s, self.deadline, self.clock)


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

    @classmethod
    def workload(cls, config: RunConfig, model_cached: bool = False, device_type: str = "cuda") -> Workload:
        """The images this run pushes through its model, for time estimates (``repro.execute.estimate``).

        ``model_cached``: the trained model is already in the checkpoint cache (or trained earlier in the same
        campaign), so a task that reuses it does not pay for training. ``device_type`` (``cpu`` or ``cuda``):
        where a task batches its work differently by device.
        """
        return Workload() if model_cached else training_workload(config, device_type)

    @classmethod
    def row_identities(cls, config: RunConfig) -> list[dict[str, Any]]:
        """The ``extra_columns`` values of every table row a run of ``config`` writes, so that a reference naming
        a row (a method, corruption, severity, batch size) no run produces is refused when the suite loads."""
        return []

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


def typed_config(config: dict[str, Any]) -> RunConfig:
    """A stored run config (a record's), typed with its task's ``Options``: ``RunConfig.from_stored``."""
    return RunConfig.from_stored(config, TASKS.get(config["task"]).Options)


def build_run_model(run: RunSpec, data: ImageDataset) -> torch.nn.Module:
    """The run's model, seeded so that the initial weights depend on the run's seed only."""
    config = run.typed_config
    seed_everything(config.seed)
    return build_model(
        config.backbone, config.normalizer.name, num_classes=data.num_classes, in_chans=data.in_chans,
        small_input=config.model.small_input, pretrained=config.model.pretrained, **config.normalizer.options,
    )


def model_key(config: dict[str, Any]) -> str:
    """Hash of the parts of a run's config that determine its trained weights.

    Not the suite, its version or the task: suites that train the same model share it. Synchronized
    BatchNorm changes the weights, so it is part of the key when set (and absent otherwise, which keeps the keys
    of existing checkpoints). The data itself is checked against the fingerprint saved with the weights.
    """
    parts = {key: config[key] for key in ("dataset", "backbone", "model", "train", "seed")}
    parts["normalizer"] = {"name": config["normalizer"]["name"], "options": config["normalizer"]["options"]}
    if config.get("task_options", {}).get("sync_batchnorm"):
        parts["sync_batchnorm"] = True
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
    #: what the training's record would say of it beyond its metrics (e.g. where it resumed), also when loaded
    training_extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(model: torch.nn.Module, metrics: dict[str, Any], run: RunSpec, ctx: RunContext,
                    result: TrainResult | None = None) -> Path:
    """Write the weights and training metrics atomically (a killed run never leaves a truncated checkpoint).

    With the ``result`` of the training (curve, timings) a ``train`` run of another suite with the same recipe
    can report it instead of training again.
    """
    path = ctx.checkpoint_path(run)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": state, "metrics": metrics, "model_key": model_key(run.config),
                               "data_fingerprint": ctx.data_fingerprint(run.typed_config.dataset)}
    if result is not None:  # a train task's model: another suite with the same training reports it
        payload["result"] = {"curve": result.curve, "wall_time_s": result.wall_time_s,
                             "images_per_s": result.images_per_s, "peak_memory_mb": result.peak_memory_mb,
                             "extra": result.extra}
        payload["suite"] = run.suite
    with atomic_path(path) as partial:
        torch.save(payload, partial)
    return path


def load_checkpoint(model: torch.nn.Module, run: RunSpec, ctx: RunContext) -> dict[str, Any] | None:
    """The saved checkpoint (``metrics``, and ``result`` and ``suite`` when a train task saved it), with the weights
    loaded into ``model``; None when there is no usable checkpoint. A corrupt or mismatched file is moved aside
    with a warning that names it, so the model is trained again instead of failing every rerun."""
    path = ctx.checkpoint_path(run)
    if ctx.retrain or not path.is_file():
        return None
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    fingerprint = ctx.data_fingerprint(run.typed_config.dataset)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, metrics = saved["state_dict"], dict(saved["metrics"])
        if {name: tensor.shape for name, tensor in state.items()} != expected:
            problem = "does not fit the model (other parameter names or shapes)"
        elif saved.get("data_fingerprint", fingerprint) != fingerprint:
            problem = "was trained on other data (its data fingerprint differs)"
        else:
            model.load_state_dict(state)  # checked above: it loads whole or not at all
            return {**saved, "metrics": metrics}
    except Exception as err:  # anything unreadable: truncated, not a checkpoint, not a dict
        problem = f"is unreadable ({type(err).__name__})"
    move_aside("checkpoint", path, problem, "training again")
    return None


def reports_saved_training(saved: dict[str, Any], suite: str) -> bool:
    """Whether a ``train`` run of ``suite`` reports the training a checkpoint holds instead of training: one saved
    with its result (curve, timings) by another suite. A suite never reuses its own, so ``--force`` and a rerun of
    a suite train again."""
    return "result" in saved and saved.get("suite") != suite


def saved_trainings(results_dir: Path) -> dict[str, str | None]:
    """Model key -> the suite that saved the checkpoint's training with its result (None: weights and metrics only,
    which tasks that evaluate a model load but a ``train`` run does not report). Storages are memory-mapped, not
    read, so this costs a file's header each."""
    saved: dict[str, str | None] = {}
    for path in sorted((results_dir / "checkpoints").glob("*.pt")):
        if path.name.endswith(".resume.pt"):
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # unreadable: whoever loads it moves it aside and trains again
            continue
        saved[path.stem] = payload.get("suite") if "result" in payload else None
    return saved


def train_or_load(run: RunSpec, ctx: RunContext, *, save: bool = True) -> TrainedModel:
    """The run's model trained with its recipe: loaded when a checkpoint of the same training exists.

    Tasks that evaluate trained models (quantization, test-time adaptation) call this, so a model is trained
    once however many suites and tasks use it. Diverged models are returned but never saved.
    """
    data = ctx.dataset(run.typed_config.dataset)
    model = build_run_model(run, data)
    saved = load_checkpoint(model, run, ctx)
    if saved is not None:
        return TrainedModel(model.to(ctx.device), data, "ok", saved["metrics"], from_checkpoint=True,
                            training_extra=dict((saved.get("result") or {}).get("extra") or {}))
    result = train_and_evaluate(model, data, run.typed_config.train, device=ctx.device, seed=run.typed_config.seed,
                                progress=ctx.progress,
                                description=run.label, resume=ctx.resume_policy(run))
    if save and result.status == "ok":  # with the result: a train run of another suite reports it
        save_checkpoint(model, result.metrics, run, ctx, result)
    # handed on in the layout a loaded model has: a channels-last model's convolutions round differently, so a
    # task's numbers would depend on whether its process trained the model or loaded it (--workers, campaigns)
    model.to(memory_format=torch.contiguous_format)
    return TrainedModel(model, data, result.status, result.metrics, from_checkpoint=False, result=result,
                        training_extra=dict(result.extra))
