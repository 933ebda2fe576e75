"""timm's LayerNorm2d (Ba et al. 2016, over channels at each pixel, as ConvNeXt uses it) in place of every BN."""

from repro.norms.base import PerSampleNormalizer, register_normalizer
from repro.norms.timm_layers import TimmNorm


@register_normalizer("layernorm2d")
class LayerNorm2d(PerSampleNormalizer, TimmNorm):
    timm_layer = "layernorm2d"

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps
