"""No normalization: every BatchNorm removed, activations kept."""

from torch import nn

from repro.norms.base import Normalizer, register_normalizer, replace_batchnorms


@register_normalizer("none")
class NoNorm(Normalizer):
    """The un-normalized baseline (MimicNorm's NoNorm): BNs become identities and nothing else changes."""

    micro_batches_in_one_pass = True
    invariant_to = frozenset({"train.micro_batch"})

    def apply(self, model: nn.Module) -> nn.Module:
        replace_batchnorms(model, lambda name, bn: nn.Identity())
        return model
