"""Resumable training: everything that decides the rest of a run, saved at an epoch's end.

A run continued from such a state ends with the same weights and metrics as one that never stopped: the
state holds the weights and buffers, the optimizer's momentum, the scheduler's step, every random generator
that a later epoch draws from (data order and augmentation, mixup, torch's global CPU and CUDA generators),
the normalizers' own training state (Batch Renorm's schedule, Cross-Iteration BN's window) and the curve so far.

Saved at the first epoch end after ``every_s`` seconds since the last save, and at the last epoch end before
the deadline that leaves no time for another epoch; deleted when the run completes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repro.store.atomic import atomic_path, move_aside

RESUME_FORMAT = 1


@dataclass
class ResumePolicy:
    """Where a run's resumable state lives, how often it is saved, and when the run must stop."""

    path: Path
    every_s: float | None = None
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic
    _last_save: float = field(init=False)

    def __post_init__(self) -> None:
        self._last_save = self.clock()

    def should_stop(self, epoch_seconds: float) -> bool:
        """Whether another epoch like the last one would end after the deadline."""
        return self.deadline is not None and self.clock() + epoch_seconds > self.deadline

    def should_save(self) -> bool:
        return self.every_s is not None and self.clock() - self._last_save >= self.every_s

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as partial:
            torch.save({"format": RESUME_FORMAT, **state}, partial)
        self._last_save = self.clock()

    def load(self) -> dict[str, Any] | None:
        """The saved state; None when there is none. An unreadable one is moved aside with a warning naming it,
        and the run starts over."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("format") == RESUME_FORMAT:
                return state
            problem = f"has format {state.get('format')!r}, not {RESUME_FORMAT}"
        except Exception as err:  # truncated, not a torch file, not a dict
            problem = f"is unreadable ({type(err).__name__})"
        move_aside("training state", self.path, problem, "starting over")
        return None

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def normalizer_states(model: nn.Module) -> dict[str, Any]:
    """Training state that normalization layers keep outside their buffers (``training_state()``)."""
    return {name: module.training_state() for name, module in model.named_modules()
            if hasattr(module, "training_state")}


def load_normalizer_states(model: nn.Module, states: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    for name, state in states.items():
        modules[name].load_training_state(state)


def random_states(device: torch.device) -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def load_random_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
