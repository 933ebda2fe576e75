"""GroupNorm (Wu & He 2018) in place of every BatchNorm, by group count or by channels per group."""

import torch
from torch import nn

from repro.errors import UserError
from repro.norms.base import PerSampleNormalizer, copy_affine, register_normalizer, replace_batchnorms


class ChannelsFirstBf16GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalizes a channels-last bfloat16 CPU input in the contiguous (NCHW) layout.

    Under CPU autocast group_norm runs in the input's dtype. PyTorch's channels-last CPU kernel (below 1024 pixels
    per plane) walks every (image, group) pixel by pixel over the group's C/G channels; with ResNet-20's 2 to 8
    channels per group its bfloat16 path spends the time on partial-vector loads and bf16/float conversions of a
    few lanes: GN's forward took 7-10x its float32 time, and the bf16 training step 1.9-2.3x the float32 one
    (2026-12-05, 1 thread, batch 128). The contiguous kernel reduces whole planes: with it the bf16 step takes
    0.6-0.66x the float32 one. The arithmetic is the same (float accumulation, bf16 output) in another summation
    order, for two layout copies; float32 inputs keep the channels-last kernel (copies and contiguous kernel
    together were no faster there).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


@register_normalizer("gn")
class GroupNorm(PerSampleNormalizer):
    """``groups`` groups per layer (the paper's G=32), or ``group_size`` channels per group when given.

    ``group_size`` is what makes 16- or 24-channel layers work (e.g. ``group_size=8``).
    """

    def __init__(self, groups: int = 32, group_size: int | None = None, eps: float = 1e-5) -> None:
        self.groups = groups
        self.group_size = group_size
        self.eps = eps

    def num_groups(self, channels: int, layer: str) -> int:
        if self.group_size is not None:
            if channels % self.group_size:
                raise UserError(
                    f"gn: layer {layer} has {channels} channels, not divisible by group_size={self.group_size}"
                )
            return channels // self.group_size
        if channels % self.groups:
            raise UserError(
                f"gn: layer {layer} has {channels} channels, not divisible by groups={self.groups}; "
                "set group_size instead"
            )
        return self.groups

    def apply(self, model: nn.Module) -> nn.Module:
        def make(name: str, bn: nn.BatchNorm2d) -> nn.Module:
            gn = ChannelsFirstBf16GroupNorm(self.num_groups(bn.num_features, name), bn.num_features, eps=self.eps)
            copy_affine(bn, gn)
            return gn

        replace_batchnorms(model, make)
        return model
