"""Learning-rate schedule as a per-step multiplier: linear warm-up, then cosine, step or constant."""

from __future__ import annotations

import math

from repro.train.config import TrainConfig


def lr_multiplier(cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    milestones = [round(m * steps_per_epoch) for m in cfg.milestones]

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return multiplier
