"""BatchNorm: timm's default, with momentum and eps as options."""

from torch import nn

from repro.norms.base import Normalizer, batchnorm_modules, register_normalizer


@register_normalizer("bn")
class BatchNorm(Normalizer):
    """Plain BatchNorm (Ioffe & Szegedy 2015); ``momentum`` is PyTorch's (weight of the new batch)."""

    has_batch_statistics = True
    micro_batches_in_one_pass = True

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5) -> None:
        self.momentum = momentum
        self.eps = eps

    def apply(self, model: nn.Module) -> nn.Module:
        for _, bn in batchnorm_modules(model):
            bn.momentum = self.momentum
            bn.eps = self.eps
        return model
