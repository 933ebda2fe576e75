"""GroupNorm (Wu & He 2018) in place of every BatchNorm, by group count or by channels per group."""

from torch import nn

from repro.errors import UserError
from repro.norms.base import Normalizer, copy_affine, register_normalizer, replace_batchnorms


@register_normalizer("gn")
class GroupNorm(Normalizer):
    """``groups`` groups per layer (the paper's G=32), or ``group_size`` channels per group when given.

    ``group_size`` is what makes 16- or 24-channel layers work (e.g. ``group_size=8``).
    """

    micro_batches_in_one_pass = True
    invariant_to = frozenset({"train.micro_batch"})

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
            gn = nn.GroupNorm(self.num_groups(bn.num_features, name), bn.num_features, eps=self.eps)
            copy_affine(bn, gn)
            return gn

        replace_batchnorms(model, make)
        return model
