"""Wall time of one training step, to state what a normalizer costs next to BatchNorm on the same machine."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repro.train.loop import synchronize

CPU = torch.device("cpu")


@dataclass(frozen=True)
class StepTiming:
    median_ms: float
    min_ms: float
    #: CPU time of this process per step: on a shared CPU machine steadier than wall time (on CUDA only host time)
    median_cpu_ms: float
    steps: int
    threads: int


def measure_step_time(model: nn.Module, *, batch_size: int, image_size: int, in_chans: int, num_classes: int,
                      device: torch.device = CPU, steps: int = 10, warmup: int = 5,
                      seed: int = 0) -> StepTiming:
    """Time SGD steps (forward, backward, optimizer step, the normalizer's ``after_step``) on one random batch.

    The ``warmup`` untimed steps also fill CBN's windows: use ``warmup >= window`` and no burn-in to time its
    cross-iteration path (warm-up and timed steps together count as one epoch for ``before_training``).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch_size, in_chans, image_size, image_size, generator=generator, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator, device=device)
    model.to(device).train()
    normalizer = getattr(model, "normalizer", None)
    if normalizer is not None:
        normalizer.before_training(model, warmup + steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, cpu_times = [], []
    for step in range(warmup + steps):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if normalizer is not None:
            normalizer.after_step(model)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return StepTiming(1000 * statistics.median(times), 1000 * min(times), 1000 * statistics.median(cpu_times), steps,
                      torch.get_num_threads())
