"""A run's training state: the model, its optimizer and schedule, the random streams a later epoch draws from and
the progress so far. The training loop advances it an epoch at a time; it saves itself where a resumable run keeps
it (``repro.train.resume.ResumePolicy``) and loads itself from there, so a resumed run continues exactly."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from repro.train.resume import (
    ResumePolicy,
    load_normalizer_states,
    load_random_states,
    normalizer_states,
    random_states,
)


@dataclass
class TrainingState:
    """What changes as a run trains. ``loader`` is the training loader: its order and augmentation stream are
    part of the state (``rng_state`` and ``set_rng_state``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any
    mix_generator: torch.Generator
    device: torch.device
    #: epochs completed
    epoch: int = 0
    #: optimizer steps taken
    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    #: seconds spent in training epochs (evaluation left out), and the images they trained on
    train_time: float = 0.0
    trained_images: int = 0
    #: the epochs this run continued from a saved state at, which its record names
    resumed_at: list[int] = field(default_factory=list)
    #: ``time.perf_counter()`` at the run's start, moved back by the time a resumed run had already spent
    started: float = field(default_factory=time.perf_counter)

    def wall_time_s(self) -> float:
        return time.perf_counter() - self.started

    def record_extra(self) -> dict[str, Any]:
        """What the run's record says of its state: the epochs it was resumed at, if any."""
        return {"resumed_at_epochs": self.resumed_at} if self.resumed_at else {}

    def save(self, policy: ResumePolicy) -> None:
        policy.save({
            "epoch": self.epoch, "step": self.step, "curve": self.curve, "train_time": self.train_time,
            "trained_images": self.trained_images, "wall_time_s": self.wall_time_s(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "loader": self.loader.rng_state(),
            "mixup": self.mix_generator.get_state(), "random": random_states(self.device),
            "normalizers": normalizer_states(self.model), "resumed_at": self.resumed_at,
        })

    def load(self, policy: ResumePolicy) -> bool:
        """Continue from the state ``policy`` saved, if there is one (whether there was)."""
        saved = policy.load()
        if saved is None:
            return False
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.loader.set_rng_state(saved["loader"])
        self.mix_generator.set_state(saved["mixup"])
        load_random_states(saved["random"], self.device)
        load_normalizer_states(self.model, saved["normalizers"])
        self.curve, self.step, self.epoch = saved["curve"], saved["step"], saved["epoch"]
        self.resumed_at = [*saved.get("resumed_at", []), self.epoch]
        self.train_time, self.trained_images = saved["train_time"], saved["trained_images"]
        self.started -= saved["wall_time_s"]
        return True
