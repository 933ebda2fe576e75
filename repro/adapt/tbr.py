"""``tbr``: DELTA's test-time batch renormalization (Zhao et al., ICLR 2023, arXiv 2301.13018).

TBR keeps moving averages μ_ema, σ_ema of the test batches' statistics (initialized with the first batch's,
not the source's) and renormalizes each batch Batch-Renorm style, with the corrections treated as constants:

    σ_batch = sqrt(var_batch + ε)   (biased variance),   r = sg(σ_batch)/σ_ema,   d = sg(μ_batch − μ_ema)/σ_ema
    y = γ·((x − μ_batch)/σ_batch · r + d) + β
    μ_ema ← α·μ_ema + (1−α)·sg(μ_batch),   σ_ema ← α·σ_ema + (1−α)·sg(σ_batch)

In value y = γ·(x − μ_ema)/σ_ema + β with the averages from *before* the current batch; the gradient, where a
loss is minimized through it, is that of batch statistics. The moving averages are updated after normalizing.
DELTA adds TBR under a TENT-style entropy step with dynamic online re-weighting; this method is TBR alone
(no parameter is learned), the statistics part the paper ablates.
"""

from __future__ import annotations

import torch
from torch import nn

from repro.adapt.base import AdaptationMethod, register_method
from repro.adapt.batchnorm import affine_and_activation, channel_view, replace_batchnorms, statistics_frozen
from repro.errors import UserError


class RenormalizedBatchNorm(nn.Module):
    """A BN that renormalizes each batch towards moving averages of the test batches' statistics."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, momentum: float) -> None:
        super().__init__()
        self.layer = layer
        self.momentum = momentum
        self.register_buffer("ema_mean", torch.zeros(layer.num_features))
        self.register_buffer("ema_std", torch.ones(layer.num_features))
        self.started = False  # no batch seen since the last reset: the first one sets the averages
        self.update = True  # False: renormalize with the current averages, change nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce = [0, *range(2, x.ndim)]
        batch_var, batch_mean = torch.var_mean(x.float(), dim=reduce, correction=0)
        batch_std = torch.sqrt(batch_var + self.layer.eps)
        if not self.started:
            ema_mean, ema_std = batch_mean.detach(), batch_std.detach()
        else:
            ema_mean, ema_std = self.ema_mean, self.ema_std
        r = batch_std.detach() / ema_std
        d = (batch_mean.detach() - ema_mean) / ema_std
        normalized = (x - channel_view(batch_mean, x)) / channel_view(batch_std, x)
        y = affine_and_activation(normalized * channel_view(r, x) + channel_view(d, x), self.layer)
        if self.update:
            self.ema_mean.copy_(self.momentum * ema_mean + (1 - self.momentum) * batch_mean.detach())
            self.ema_std.copy_(self.momentum * ema_std + (1 - self.momentum) * batch_std.detach())
            self.started = True
        return y

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


@register_method("tbr")
class TestTimeBatchRenorm(AdaptationMethod):
    """Every BN renormalizes each test batch towards moving averages of the test statistics (no learning).

    The first batch after a reset is normalized with its own statistics (as ``ptbn``), later ones with the
    averages of the batches before them, so the reset policy matters. On a model without BN (GroupNorm, Fixup,
    none) it predicts as ``source`` and ``adapts`` is False; the source running statistics are never read.

    Args:
        momentum: α, the weight of the old average: 0.95, DELTA's ``old_prior`` in all six configs of its
            official code that run DELTA (bwbwzhao/DELTA; the other two, source and norm, have no TBR).
        adapt_1d: also replace ``BatchNorm1d`` layers; off by default as in the other methods.
    """

    stateful = True
    forward_only = True

    def __init__(self, model: nn.Module, *, momentum: float = 0.95, adapt_1d: bool = False) -> None:
        if not 0 <= momentum < 1:
            raise UserError(f"tbr: momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.adapt_1d = adapt_1d
        super().__init__(model)

    def _convert(self, model: nn.Module) -> list[str]:
        return replace_batchnorms(model, lambda layer: RenormalizedBatchNorm(layer, self.momentum), self.adapt_1d)

    def _layers(self) -> list[RenormalizedBatchNorm]:
        return [m for m in self.model.modules() if isinstance(m, RenormalizedBatchNorm)]

    def reset(self) -> None:
        super().reset()
        for layer in self._layers():
            layer.started = False

    @torch.no_grad()
    def predict_frozen(self, batch: torch.Tensor) -> torch.Tensor:
        with statistics_frozen(self.model):
            return self._forward(batch)
