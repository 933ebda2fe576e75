"""The ``train`` task: train one configuration from scratch and evaluate it after every epoch."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from repro.data import ImageDataset
from repro.errors import UserError
from repro.models import build_model
from repro.tasks.base import (
    RunContext,
    RunOutcome,
    RunSpec,
    Task,
    build_run_model,
    load_checkpoint,
    register_task,
    reports_saved_training,
    save_checkpoint,
)
from repro.train import TrainConfig, TrainResult, train_and_evaluate
from repro.train.timing import measure_step_time


def step_time_against_bn(run: RunSpec, model: torch.nn.Module, data: ImageDataset, cfg: TrainConfig,
                         device: torch.device) -> dict[str, float]:
    """Median time of a training step on one micro-batch: the trained model (a copy, past any burn-in, so CBN
    times its cross-iteration path) and a freshly built BN model of the same backbone.

    On CPU the process's CPU time is used: on a shared machine it is far steadier than wall time. Both steps run
    under the run's CPU autocast (``amp_cpu``).
    """
    shape = {"batch_size": cfg.micro_batch or cfg.batch_size, "image_size": data.train.image_size,
             "in_chans": data.in_chans, "num_classes": data.num_classes, "device": device}
    bn_twin = build_model(run.typed_config.backbone, "bn", num_classes=data.num_classes, in_chans=data.in_chans,
                          small_input=run.typed_config.model.small_input)
    timings = [measure_step_time(m, **shape, amp_cpu=cfg.amp_cpu) for m in (copy.deepcopy(model), bn_twin)]
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
        options: TrainOptions = run.typed_config.task_options
        data_parallel = ctx.data_parallel
        if options.sync_batchnorm:
            if data_parallel is None:
                raise UserError(f"suite {run.suite}: task_options.sync_batchnorm needs data-parallel processes "
                                "(repro run --nproc N)")
            data_parallel = dataclasses.replace(data_parallel, sync_batchnorm=True)
        data = ctx.dataset(run.typed_config.dataset)
        model = build_run_model(run, data)
        cfg = run.typed_config.train
        is_main = data_parallel is None or data_parallel.is_main
        saved = load_checkpoint(model, run, ctx)
        if saved is not None and reports_saved_training(saved, run.suite):  # reported, not repeated
            model.to(ctx.device)
            reported = dict(saved["result"])
            extra = {**reported.pop("extra", {}), "from_checkpoint": saved["model_key"]}  # e.g. where it resumed
            result = TrainResult("ok", saved["metrics"], **reported, extra=extra)
        else:
            if saved is not None:  # the checkpoint's weights went into the model: start from the seeded init
                model = build_run_model(run, data)
            result = train_and_evaluate(model, data, cfg, device=ctx.device, seed=run.typed_config.seed,
                                        progress=ctx.progress, description=run.label, data_parallel=data_parallel,
                                        resume=ctx.resume_policy(run))
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
        options: TrainOptions = run.typed_config.task_options
        if options.step_time_vs_bn and outcome.status == "ok":
            data = ctx.dataset(run.typed_config.dataset)
            outcome.metrics.update(step_time_against_bn(run, build_run_model(run, data), data, run.typed_config.train,
                                                        ctx.device))
        return outcome
