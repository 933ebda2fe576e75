"""The ``memory`` task: peak memory and speed of a training step per normalizer, on random inputs.

MimicNorm's Table 3 measures a training step at batch 256 and 224×224 pixels; memory does not depend on pixel
values, so random images stand in for the data. The batch size, bf16 autocast (``train.amp``, ``train.amp_cpu``)
and channels-last come from the suite's ``train`` block, image size and classes from the task options.

How memory is measured:

* CUDA: ``torch.cuda.max_memory_allocated`` over the steps, reset after the model and the batch are on the
  device, in this process. It counts tensors only, not the CUDA context or the allocator's cache, so it is
  below the paper's ``nvidia-smi`` numbers; differences between normalizers are what carries over.
* CPU: the process's peak resident set over the steps (reset before the first where Linux allows it). A
  process keeps memory it freed and may reuse it unseen, and without the reset the peak is a high-water mark
  over the process's whole life; each configuration is therefore measured in a fresh Python process, whose
  peak includes the interpreter and libraries (``memory_before_mb`` states that part).
  A new interpreter rather than ``multiprocessing``: a spawned child re-runs an unguarded ``__main__`` (the
  CLI's), and a forked child starts with the parent's resident pages and malloc arenas.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from repro.models import build_model
from repro.tasks.base import RunContext, RunOutcome, RunSpec, Task, register_task
from repro.tasks.config import RunConfig
from repro.tasks.workload import Workload
from repro.train import seed_everything
from repro.train.timing import measure_step_time


class MemoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(default=224, ge=8)
    in_chans: int = Field(default=3, ge=1)
    num_classes: int = Field(default=1000, ge=2)
    steps: int = Field(default=3, ge=1, description="timed steps")
    warmup: int = Field(default=1, ge=0, description="untimed steps first (kernel selection, lazy allocations)")


def measure_training_step(config: RunConfig, device: str, threads: int) -> dict[str, Any]:
    """Build the run's model and time its steps (in this process)."""
    torch.set_num_threads(threads)
    options: MemoryOptions = config.task_options
    train = config.train
    seed_everything(config.seed)
    model = build_model(config.backbone, config.normalizer.name, num_classes=options.num_classes,
                        in_chans=options.in_chans, small_input=config.model.small_input, **config.normalizer.options)
    timing = measure_step_time(
        model, batch_size=train.batch_size, image_size=options.image_size, in_chans=options.in_chans,
        num_classes=options.num_classes, device=torch.device(device), steps=options.steps, warmup=options.warmup,
        seed=config.seed, amp=train.amp, channels_last=train.channels_last, amp_cpu=train.amp_cpu,
    )
    return dataclasses.asdict(timing)


_CHILD = ("import json, sys; from repro.tasks.base import typed_config; "
          "from repro.tasks.memory import measure_training_step; config, device, threads = json.loads(sys.argv[1]); "
          "print(json.dumps(measure_training_step(typed_config(config), device, threads)))")


def measure_in_fresh_process(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """``measure_training_step`` on CPU in a new interpreter, so that its peak RSS is this configuration's alone.
    ``config`` is the run's stored form, which crosses to the child as JSON."""
    package_root = str(Path(__file__).resolve().parents[2])  # the same repro as this process, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([config, "cpu", threads])], env=env,
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"memory measurement process failed: {child.stderr.strip().splitlines()[-1:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


@register_task("memory")
class MemoryTask(Task):
    """Peak memory, step time and images/s of SGD steps on one random batch (module docstring: how measured)."""

    Options = MemoryOptions
    table_metrics = ("peak_memory_mb", "step_memory_mb", "step_time_ms", "images_per_s")

    @classmethod
    def workload(cls, config: RunConfig, model_cached: bool = False, device_type: str = "cuda") -> Workload:
        options: MemoryOptions = config.task_options
        steps = options.steps + options.warmup
        return Workload(train_images=steps * config.train.batch_size, passes=steps)

    def run(self, run: RunSpec, ctx: RunContext) -> RunOutcome:
        start = time.perf_counter()
        threads = torch.get_num_threads()
        if ctx.device.type == "cuda":
            timing = measure_training_step(run.typed_config, str(ctx.device), threads)
        else:
            timing = measure_in_fresh_process(run.config, threads)
        batch_size = run.typed_config.train.batch_size
        images_per_s = batch_size / (timing["median_ms"] / 1000)
        metrics = {
            "peak_memory_mb": timing["peak_memory_mb"], "memory_before_mb": timing["memory_before_mb"],
            "step_memory_mb": timing["peak_memory_mb"] - timing["memory_before_mb"],
            "step_time_ms": timing["median_ms"], "step_cpu_ms": timing["median_cpu_ms"], "images_per_s": images_per_s,
        }
        measure = "cuda max_memory_allocated" if ctx.device.type == "cuda" else "peak RSS, own process"
        extra = {"threads": timing["threads"], "timed_steps": timing["steps"], "memory_measure": measure}
        return RunOutcome("ok", metrics, time.perf_counter() - start, images_per_s, timing["peak_memory_mb"],
                          extra=extra)
