"""``bn_adapt``: BN adaptation with a prior (Schneider et al. 2020, arXiv 2006.16971; code bethgelab/robustness)."""

from torch import nn

from repro.adapt.base import AdaptationMethod, register_method
from repro.adapt.batchnorm import adapt_batchnorms
from repro.errors import UserError


@register_method("bn_adapt")
class BNAdapt(AdaptationMethod):
    """Every BN normalizes with source and test-batch statistics mixed by λ = N/(N+n).

    μ̄ = λ·μ_source + (1−λ)·μ_batch and σ̄² = λ·σ²_source + (1−λ)·σ²_batch, with n the size of the current batch
    (so a smaller last batch gets a larger λ). N = 0 is full adaptation, N = ∞ (``float("inf")``) is ``source``.
    The source running statistics are read, never updated, so each batch is adapted independently.

    Args:
        pseudo_samples: N, how many test images the source statistics are worth. Required: the paper's
            best value depends on n and is not in our references.
        unbiased: divide the batch variance by m − 1 (the official code) or by m (then N = 0 equals ``ptbn``
            exactly), m = n·H·W values per channel. At batch size 1 a 2d BN still has H·W values per channel,
            so the unbiased variance exists; a layer with one value per channel uses the source statistics.
        adapt_1d: also adapt ``BatchNorm1d`` layers; off by default as in the official code.
    """

    forward_only = True

    def __init__(self, model: nn.Module, *, pseudo_samples: float, unbiased: bool = True, adapt_1d: bool = False
                 ) -> None:
        if not pseudo_samples >= 0:
            raise UserError(f"bn_adapt: pseudo_samples (N) must be >= 0, got {pseudo_samples}")
        self.pseudo_samples = float(pseudo_samples)
        self.unbiased = unbiased
        self.adapt_1d = adapt_1d
        super().__init__(model)

    def _convert(self, model: nn.Module) -> list[str]:
        return adapt_batchnorms(model, pseudo_samples=self.pseudo_samples, unbiased=self.unbiased,
                                adapt_1d=self.adapt_1d)
