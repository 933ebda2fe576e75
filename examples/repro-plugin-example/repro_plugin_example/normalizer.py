"""``channel_rms``: each pixel's feature vector divided by its root mean square over the channels, then a learned
per-channel scale and shift (RMSNorm over channels at each position, no mean subtracted).

Per-sample, so it does not depend on the batch: micro-batches change nothing.
"""

import torch
from torch import nn

from repro.norms import register_normalizer
from repro.norms.base import PerSampleNormalizer, copy_affine, replace_batchnorms


class ChannelRMSNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().square().mean(dim=1, keepdim=True).add(self.eps).rsqrt().to(x.dtype)
        return x * rms * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@register_normalizer("channel_rms")
class ChannelRMS(PerSampleNormalizer):
    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def apply(self, model: nn.Module) -> nn.Module:
        def make(name: str, bn: nn.BatchNorm2d) -> nn.Module:
            layer = ChannelRMSNorm2d(bn.num_features, self.eps)
            copy_affine(bn, layer)  # keeps timm's zero init of a residual branch's last norm
            return layer

        replace_batchnorms(model, make)
        return model
