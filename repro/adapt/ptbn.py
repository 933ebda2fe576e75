"""``ptbn``: prediction-time BatchNorm (Nado et al. 2020, arXiv 2006.10963)."""

from torch import nn

from repro.adapt.base import AdaptationMethod, register_method
from repro.adapt.batchnorm import adapt_batchnorms


@register_method("ptbn")
class PredictionTimeBN(AdaptationMethod):
    """Every BN normalizes each test batch with that batch's own mean and (biased) variance.

    The output equals a BN forward in train mode on the same batch, but the source running statistics are
    neither used nor updated (a BN in train mode would overwrite them with momentum); nothing is learned, so
    each batch's prediction depends only on that batch.

    Args:
        adapt_1d: also use batch statistics in ``BatchNorm1d`` layers (MimicNorm's BN on the logits). Off by
            default, as in the official TENT and robusta code, which adapt only 2d BNs.
    """

    forward_only = True

    def __init__(self, model: nn.Module, *, adapt_1d: bool = False) -> None:
        self.adapt_1d = adapt_1d
        super().__init__(model)

    def _convert(self, model: nn.Module) -> list[str]:
        return adapt_batchnorms(model, pseudo_samples=0.0, unbiased=False, adapt_1d=self.adapt_1d)
