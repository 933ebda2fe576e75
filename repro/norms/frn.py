"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020, arXiv:1911.09737),
timm's ``FilterResponseNormTlu2d``: per-sample, per-channel mean square, then ``max(x, tau)`` as nonlinearity."""

from repro.norms.base import PerSampleNormalizer, register_normalizer
from repro.norms.timm_layers import TimmNormAct


@register_normalizer("frn_tlu")
class FilterResponseNormTlu(PerSampleNormalizer, TimmNormAct):
    timm_layer = "frntlu"

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = eps
