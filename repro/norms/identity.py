"""No normalization: every BatchNorm removed, activations kept."""

from torch import nn

from repro.norms.base import PerSampleNormalizer, register_normalizer, replace_batchnorms


@register_normalizer("none")
class NoNorm(PerSampleNormalizer):
    """The un-normalized baseline (MimicNorm's NoNorm): BNs become identities and nothing else changes."""

    def apply(self, model: nn.Module) -> nn.Module:
        replace_batchnorms(model, lambda name, bn: nn.Identity())
        return model
