"""timm's GroupNorm1: GroupNorm with one group (every channel and pixel of a sample together), in place of every
BN: the per-sample normalization of PoolFormer and the like."""

from repro.norms.base import PerSampleNormalizer, register_normalizer
from repro.norms.timm_layers import TimmNorm


@register_normalizer("gn1")
class GroupNorm1(PerSampleNormalizer, TimmNorm):
    timm_layer = "groupnorm1"

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = eps
