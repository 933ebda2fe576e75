"""Batch Renormalization (Ioffe 2017): BatchNorm whose training output is pulled towards the running statistics.

With r = σ_B/σ and d = (μ_B − μ)/σ held constant (no gradient, as in the paper), the training output
γ·(x̂·r + d) + β is an ordinary BatchNorm with weight γ·r and bias β + γ·d. The layer therefore calls the native
BatchNorm kernel, and clipping r to [1/r_max, r_max] and d to [−d_max, d_max] with r_max = 1, d_max = 0 gives
``nn.BatchNorm2d`` bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.errors import UserError
from repro.norms.base import (
    Normalizer,
    channel_mean_var,
    register_normalizer,
    replace_batchnorms,
    running_average_factor,
)


def _ramp(steps_since_start: int, length: int) -> float:
    """0 before the ramp starts, rising linearly to 1 after ``length`` steps (at its start when ``length`` is 0)."""
    if steps_since_start < 0:
        return 0.0
    return 1.0 if length == 0 else min(1.0, steps_since_start / length)


class BatchRenorm2d(nn.BatchNorm2d):
    """BatchNorm2d with clipped renormalization; running statistics, eval mode and state dict as ``nn.BatchNorm2d``.

    The clipping limits follow the paper's schedule: r_max = 1 and d_max = 0 (plain BN) for ``warmup_steps``
    optimizer steps, then linear ramps reaching ``r_max`` after ``r_max_ramp_steps`` and ``d_max`` after
    ``d_max_ramp_steps`` more steps. Call ``advance_schedule()`` after every optimizer step (the ``brn``
    normalizer's ``after_step`` does); the step count is plain Python state, not part of the state dict.
    """

    def __init__(self, num_features: int, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
                 r_max_ramp_steps: int = 35000, d_max_ramp_steps: int = 20000, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if r_max < 1 or d_max < 0 or min(warmup_steps, r_max_ramp_steps, d_max_ramp_steps) < 0:
            raise ValueError("BatchRenorm2d needs r_max >= 1, d_max >= 0 and non-negative step counts")
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps = r_max_ramp_steps
        self.d_max_ramp_steps = d_max_ramp_steps
        self.steps_done = 0

    def advance_schedule(self) -> None:
        self.steps_done += 1

    def training_state(self) -> dict[str, int]:
        """The schedule's position, which a resumed run continues from (``repro.train.resume``)."""
        return {"steps_done": self.steps_done}

    def load_training_state(self, state: dict[str, int]) -> None:
        self.steps_done = state["steps_done"]

    def clipping_limits(self) -> tuple[float, float]:
        """The current (r_max, d_max) of the schedule."""
        since_warmup = self.steps_done - self.warmup_steps
        r_max = 1.0 + (self.r_max - 1.0) * _ramp(since_warmup, self.r_max_ramp_steps)
        d_max = self.d_max * _ramp(since_warmup, self.d_max_ramp_steps)
        return r_max, d_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):  # eval, or no running statistics to renormalize to
            return super().forward(x)
        self._check_input_dim(x)
        with torch.no_grad():
            r, d = self.renormalization(*channel_mean_var(x), self.running_mean, self.running_var)
        weight, bias = (self.weight * r, self.bias + self.weight * d) if self.affine else (r, d)
        factor = running_average_factor(self)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, factor, self.eps)

    @torch.no_grad()
    def renormalization(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, running_mean: torch.Tensor,
                        running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's clipped r and d of batch statistics against running ones (also per ghost batch, ``(G, C)``)."""
        r_max, d_max = self.clipping_limits()
        running_std = (running_var + self.eps).sqrt()
        r = ((batch_var + self.eps).sqrt() / running_std).clamp(1.0 / r_max, r_max)
        d = ((batch_mean - running_mean) / running_std).clamp(-d_max, d_max)
        return r, d

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_ramp_steps={self.r_max_ramp_steps}, d_max_ramp_steps={self.d_max_ramp_steps}")


@register_normalizer("brn")
class BatchRenorm(Normalizer):
    """Batch Renormalization in place of every BatchNorm; step counts are optimizer steps.

    The defaults are the paper's ImageNet schedule as usually quoted (plain BN for 5k steps, r_max = 3 reached at
    40k and d_max = 5 at 25k steps); short runs must scale them down, or BRN stays plain BN throughout.
    Note: the running averages are BN's (the variance is averaged, not σ), and in the one-process micro-batch
    simulation each micro-batch renormalizes against running statistics already updated by the previous ones,
    unlike data-parallel ranks, which all start a step from rank 0's.
    """

    has_batch_statistics = True
    micro_batches_in_one_pass = True

    def __init__(self, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
                 r_max_ramp_steps: int = 35000, d_max_ramp_steps: int = 20000, momentum: float = 0.1,
                 eps: float = 1e-5) -> None:
        if r_max < 1 or d_max < 0 or min(warmup_steps, r_max_ramp_steps, d_max_ramp_steps) < 0:
            raise UserError("brn: r_max must be >= 1, d_max >= 0 and the step counts >= 0")
        self.layer_options = {"r_max": r_max, "d_max": d_max, "warmup_steps": warmup_steps,
                              "r_max_ramp_steps": r_max_ramp_steps, "d_max_ramp_steps": d_max_ramp_steps,
                              "momentum": momentum, "eps": eps}

    def apply(self, model: nn.Module) -> nn.Module:
        def make(name: str, bn: nn.BatchNorm2d) -> nn.Module:
            renorm = BatchRenorm2d(bn.num_features, affine=bn.affine, track_running_stats=bn.track_running_stats,
                                   **self.layer_options)
            renorm.load_state_dict(bn.state_dict())
            return renorm

        replace_batchnorms(model, make)
        return model

    def after_step(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, BatchRenorm2d):
                module.advance_schedule()
