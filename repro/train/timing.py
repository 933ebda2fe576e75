"""Wall time and memory of one training step, to state what a normalizer costs next to BatchNorm on one machine."""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repro.train.loop import autocast, peak_memory_mb, synchronize

CPU = torch.device("cpu")


@dataclass(frozen=True)
class StepTiming:
    median_ms: float
    min_ms: float
    #: CPU time of this process per step: on a shared CPU machine steadier than wall time (on CUDA only host time)
    median_cpu_ms: float
    steps: int
    threads: int
    #: CUDA: allocator peak over the steps; CPU: peak RSS over the steps (``reset_peak_memory``)
    peak_memory_mb: float
    #: memory held just before the first step (weights, the batch; on CPU also the interpreter and libraries)
    memory_before_mb: float


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak-memory window and return the memory held now, in MB.

    On CPU (Linux, glibc) free heap memory goes back to the system first (``malloc_trim``), so that new
    allocations show up as new resident pages, then writing 5 to ``/proc/self/clear_refs`` sets the peak RSS to
    the current RSS (read back as ``VmHWM``: ``getrusage`` keeps the peak of exited threads). Elsewhere the CPU
    peak stays a whole-process high-water mark, and memory freed but kept may be reused unseen: CPU comparisons
    want a fresh process per configuration.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return window_peak_memory_mb(device)


def window_peak_memory_mb(device: torch.device) -> float:
    """The peak since ``reset_peak_memory``: CUDA allocator peak, or the process's ``VmHWM`` on Linux."""
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return peak_memory_mb(device)


def measure_step_time(model: nn.Module, *, batch_size: int, image_size: int, in_chans: int, num_classes: int,
                      device: torch.device = CPU, steps: int = 10, warmup: int = 5, seed: int = 0,
                      amp: bool = False, channels_last: bool = False, amp_cpu: bool = False) -> StepTiming:
    """Time SGD steps (forward, backward, optimizer step, the normalizer's ``after_step``) on one random batch.

    The ``warmup`` untimed steps also fill CBN's windows: use ``warmup >= window`` and no burn-in to time its
    cross-iteration path (warm-up and timed steps together count as one epoch for ``before_training``).
    ``amp`` and ``channels_last`` act on CUDA only (bf16 autocast, channels-last layout), ``amp_cpu`` on the CPU
    only (bf16 autocast), as in the trainer.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch_size, in_chans, image_size, image_size, generator=generator, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator, device=device)
    model.to(device).train()
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    normalizer = getattr(model, "normalizer", None)
    if normalizer is not None:
        normalizer.before_training(model, warmup + steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, cpu_times = [], []
    memory_before = reset_peak_memory(device)
    for step in range(warmup + steps):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp, amp_cpu):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        if normalizer is not None:
            normalizer.after_step(model)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return StepTiming(1000 * statistics.median(times), 1000 * min(times), 1000 * statistics.median(cpu_times), steps,
                      torch.get_num_threads(), window_peak_memory_mb(device), memory_before)
