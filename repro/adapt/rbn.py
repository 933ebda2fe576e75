"""``rbn``: RoTTA's robust batch normalization (Yuan et al., CVPR 2023, arXiv 2303.13899; code BIT-DA/RoTTA).

RoTTA replaces every BN by a layer that keeps *global* statistics, starting from the source running
statistics, and moves them towards each batch's with momentum α (the paper's Eq. 5-6; ``ALPHA: 0.05`` in the
official config):

    μ_g ← (1−α)·μ_g + α·μ_batch,   σ²_g ← (1−α)·σ²_g + α·σ²_batch   (biased batch variance)

then normalizes with the updated μ_g, σ²_g and the layer's affine parameters. Here it is the normalization
alone, applied to the test stream: the rest of RoTTA (the category-balanced memory bank, the teacher-student
update with timeliness reweighting) is not part of this method.
"""

from __future__ import annotations

import torch
from torch import nn

from repro.adapt.base import AdaptationMethod, register_method
from repro.adapt.batchnorm import affine_and_activation, channel_view, replace_batchnorms, statistics_frozen
from repro.errors import UserError


class RobustBatchNorm(nn.Module):
    """A BN whose statistics start at the source's and follow the test batches with momentum α."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, momentum: float) -> None:
        super().__init__()
        if layer.running_mean is None or layer.running_var is None:
            raise UserError(f"rbn: {type(layer).__name__} keeps no running statistics to start from")
        self.layer = layer
        self.momentum = momentum
        self.register_buffer("global_mean", layer.running_mean.detach().clone())
        self.register_buffer("global_var", layer.running_var.detach().clone())
        self.update = True  # False: normalize with the current global statistics, change nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.global_mean, self.global_var
        if self.update:
            reduce = [0, *range(2, x.ndim)]
            batch_var, batch_mean = torch.var_mean(x.detach().float(), dim=reduce, correction=0)
            mean = (1 - self.momentum) * mean + self.momentum * batch_mean
            var = (1 - self.momentum) * var + self.momentum * batch_var
            self.global_mean.copy_(mean)
            self.global_var.copy_(var)
        return affine_and_activation((x - channel_view(mean, x)) * torch.rsqrt(channel_view(var, x) + self.layer.eps),
                                     self.layer)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


@register_method("rbn")
class RobustBN(AdaptationMethod):
    """Every BN normalizes with global statistics updated by each test batch (momentum α), never reset by itself.

    Unlike ``ptbn``, a batch's prediction depends on the batches before it, so the reset policy (episodic or
    continual) matters; at batch size 1 the update still uses that one image's H·W values per channel. On a
    model without BN (GroupNorm, Fixup, none) it predicts as ``source`` and ``adapts`` is False.

    Args:
        momentum: α, the weight of each batch's statistics (0.05, RoTTA's config).
        adapt_1d: also replace ``BatchNorm1d`` layers (the official code does; off here as in the other methods,
            so that a MimicNorm model's logit BN is left as trained unless asked).
    """

    stateful = True
    forward_only = True

    def __init__(self, model: nn.Module, *, momentum: float = 0.05, adapt_1d: bool = False) -> None:
        if not 0 < momentum <= 1:
            raise UserError(f"rbn: momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.adapt_1d = adapt_1d
        super().__init__(model)

    def _convert(self, model: nn.Module) -> list[str]:
        return replace_batchnorms(model, lambda layer: RobustBatchNorm(layer, self.momentum), self.adapt_1d)

    @torch.no_grad()
    def predict_frozen(self, batch: torch.Tensor) -> torch.Tensor:
        with statistics_frozen(self.model):
            return self._forward(batch)
