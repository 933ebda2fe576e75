"""The parameters that entropy-minimizing methods (SAR, EATA) learn: the affine γ, β of normalization layers.

Every BN normalizes with the test batch's statistics (as in tent); ``norm_layers="all"`` also learns the γ, β
of GroupNorm and LayerNorm layers (SAR's ResNet-50-GN and ViT models). Layers whose name is in ``skip`` or
below it keep their parameters (SAR leaves ``layer4`` of ResNets and the last blocks of ViT-B as trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from repro.adapt.batchnorm import AdaptedBatchNorm, adapt_batchnorms

NormLayers = Literal["bn", "all"]
NORM_LAYERS = ("bn", "all")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax of each row, in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in skip)


def prepare_norm_affine(model: nn.Module, *, norm_layers: NormLayers, adapt_1d: bool, skip: Sequence[str] = ()
                        ) -> list[str]:
    """Switch BNs to batch statistics and make the chosen norms' γ, β trainable; returns the layers changed."""
    changed = set(adapt_batchnorms(model, pseudo_samples=0.0, unbiased=False, adapt_1d=adapt_1d))
    other = (nn.GroupNorm, nn.LayerNorm) if norm_layers == "all" else ()
    for name, module in model.named_modules():
        layer = module.layer if isinstance(module, AdaptedBatchNorm) else module if isinstance(module, other) else None
        if layer is None or skipped(name, skip) or getattr(layer, "weight", None) is None:
            continue
        layer.weight.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
        changed.add(name)
    return sorted(changed)
