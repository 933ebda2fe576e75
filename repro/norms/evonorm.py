"""EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967), timm's layers, with their own nonlinearity."""

from repro.norms.base import PerSampleNormalizer, register_normalizer
from repro.norms.timm_layers import TimmNormAct


@register_normalizer("evonorm_b0")
class EvoNormB0(TimmNormAct):
    """Batch variance (with a running average for evaluation) and instance std: batch-dependent, like BN."""

    timm_layer = "evonormb0"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-3) -> None:
        self.momentum = momentum
        self.eps = eps


@register_normalizer("evonorm_s0")
class EvoNormS0(PerSampleNormalizer, TimmNormAct):
    """Per-sample group std, ``groups`` groups or ``group_size`` channels per group (16-channel layers need the
    latter, as GN does)."""

    timm_layer = "evonorms0"

    def __init__(self, groups: int = 32, group_size: int | None = None, eps: float = 1e-5) -> None:
        self.groups = groups
        self.group_size = group_size
        self.eps = eps
