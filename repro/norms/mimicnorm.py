"""MimicNorm (Fei et al., AAAI 2021, arXiv 2010.09278): weight mean and a last BN instead of every BatchNorm.

The recipe, on any timm model built with BatchNorm:

* every intermediate BatchNorm is removed (a fused ``BatchNormAct2d`` keeps its activation) and the conv that fed
  it gets a bias, initialised to 0;
* *weight mean*: each eligible conv's filters are projected to zero mean per output channel (over in, kh, kw) at
  build time and after every optimizer step. It is a projection, not a reparameterisation, as in the official
  code: no gradient flows through a mean. Eligible by default: fan-in ``in*kh*kw/groups > min_fan_in``, the
  official CIFAR filter (``Cifar100/main.py``) with its 50: it skips a 1- or 3-channel stem and 3x3 depthwise
  convs (fan-in 9), and projects grouped or depthwise convs whose fan-in passes. ``dense_only=True`` also
  requires ``groups == 1``; with ``min_fan_in=1`` that is the official ImageNet filter (every ``groups == 1``
  conv). No shipped suite has a grouped conv with fan-in above 50, so the two agree on all of them. Linear
  layers are never projected;
* *last BN*: ``BatchNorm1d(num_classes, affine=False)`` on the logits, wrapped around timm's classifier
  (``last_bn=False`` leaves it out: the "Weight Mean" column of the paper's Table 2, the official ``_nobn``
  models with ``--weight mean``);
* a learnable scalar at the end of each residual branch of the residual blocks it knows (timm ResNet
  ``BasicBlock``/``Bottleneck``, timm EfficientNet-family ``InvertedResidual``/``DepthwiseSeparableConv``).

Where the paper and the official code differ (paper_numbers.md §1f), ``"official"`` is the default:

* residual scalar: the code's ``1.2**m / l`` with ``m`` the number of non-depthwise convs in the branch (2 for
  a BasicBlock or a MobileNetV2 block, 3 for a Bottleneck) and ``l`` the 1-based index of the block among the
  blocks with a shortcut; a block without a shortcut (some MobileNetV2 blocks) gets ``1.2**m``, as in the
  official MobileNetV2. ``"paper"``: ``1/sqrt(l)`` (and 1 without a shortcut). 1.2 approximates the paper's
  ``1/sqrt(1 - 1/pi)`` = 1.21, the gain Theorem 3 gives a mean-subtracted ReLU layer;
* weight init: the code's He fan-in ``N(0, 2/fan_in)`` for every conv of a residual network (the 1.2 gain per
  layer sits in the residual scalar) and ``N(0, 2.8/fan_in)`` for the non-depthwise convs of a straight network
  (the official VGG). ``"paper"``: Theorem 3's ``N(0, sigma_w^2/n)`` with ``sigma_w^2 = 2n/((n-1)(1-1/pi))``
  for the projected convs, He fan-in for the others. Linear layers: ``N(0, 2/fan_in)``; all biases 0.
  The two options are independent: both ``"paper"`` is the paper's text, both ``"official"`` the code; mixing
  them counts the 1.2 gain twice or not at all.

Not reproduced: the official ImageNet ResNet's extra scalar (init 1.2) after the projection shortcut (the CIFAR
code, closest to the small-input models here, has none); the official MobileNetV2/ShuffleNetV2 files clamp the
fan-in of depthwise convs to 2 or 4 channels, here they get plain He fan-in. Families built from other blocks,
and networks whose known blocks have no shortcut (e.g. LCNet), are treated as straight networks: no scalar,
the straight-network init.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from repro.errors import UserError
from repro.norms.base import (
    Normalizer,
    batchnorm_modules,
    conv_feeding_each_batchnorm,
    register_normalizer,
    replace_batchnorms,
    set_submodule,
)

#: the BatchNorm that ends the residual branch of each block type MimicNorm knows; its scalar goes there
BRANCH_END_NORM: dict[type[nn.Module], str] = {
    BasicBlock: "bn2",
    Bottleneck: "bn3",
    InvertedResidual: "bn3",
    DepthwiseSeparableConv: "bn2",
}
#: the official code's per-layer gain, ~ 1/sqrt(1 - 1/pi) (Theorem 3)
OFFICIAL_LAYER_GAIN = 1.2
#: the official VGG conv init variance times fan-in (2/(1 - 1/pi) = 2.93 in the paper)
OFFICIAL_STRAIGHT_VARIANCE = 2.8


class BranchScale(nn.Module):
    """One learnable scalar multiplying a residual branch's output (the paper's SkipInit-like multiplier)."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class ClassifierWithLastBN(nn.Module):
    """The model's classifier followed by MimicNorm's last BN over the logits (no affine parameters)."""

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.last_bn = nn.BatchNorm1d(num_classes, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_bn(self.classifier(x))


def conv_fan_in(conv: nn.Conv2d) -> int:
    """Weights per output channel: ``in/groups * kh * kw``."""
    return conv.weight[0].numel()


def is_weight_mean_eligible(conv: nn.Conv2d, min_fan_in: int, dense_only: bool = False) -> bool:
    """The official CIFAR filter ``in*kh*kw/groups > min_fan_in``; ``dense_only`` also requires ``groups == 1``."""
    return conv_fan_in(conv) > min_fan_in and (conv.groups == 1 or not dense_only)


@torch.no_grad()
def project_weights(model: nn.Module, min_fan_in: int = 50, dense_only: bool = False) -> None:
    """MimicNorm's weight mean: subtract each eligible conv filter's mean over (in, kh, kw), in place."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and is_weight_mean_eligible(module, min_fan_in, dense_only):
            module.weight.sub_(module.weight.mean(dim=(1, 2, 3), keepdim=True))


@torch.no_grad()
def residual_block_scales(model: nn.Module, fed: dict[str, nn.Conv2d], rule: Literal["official", "paper"]
                          ) -> dict[str, float]:
    """Initial scalar for the branch-end norm of every known block, by norm name; none for a straight network."""
    blocks = [(name, block) for name, block in model.named_modules() if type(block) in BRANCH_END_NORM]
    # timm ResNet blocks always add a shortcut, EfficientNet-family blocks only when has_skip
    has_shortcut = {name: getattr(block, "has_skip", True) for name, block in blocks}
    if not any(has_shortcut.values()):
        return {}
    scales: dict[str, float] = {}
    shortcut_index = 0
    for block_name, block in blocks:
        shortcut_index += has_shortcut[block_name]
        branch_prefix, shortcut_prefix = f"{block_name}.", f"{block_name}.downsample."
        layers = sum(
            1 for bn_name, conv in fed.items()
            if bn_name.startswith(branch_prefix) and not bn_name.startswith(shortcut_prefix) and conv.groups == 1
        )
        if rule == "official":
            scale = OFFICIAL_LAYER_GAIN**layers / (shortcut_index if has_shortcut[block_name] else 1)
        else:
            scale = 1 / math.sqrt(shortcut_index) if has_shortcut[block_name] else 1.0
        scales[f"{block_name}.{BRANCH_END_NORM[type(block)]}"] = scale
    return scales


@torch.no_grad()
def initialize(model: nn.Module, rule: Literal["official", "paper"], residual: bool, min_fan_in: int,
               dense_only: bool) -> None:
    """Weight init of MimicNorm (module docstring); biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            n = conv_fan_in(module)
            if rule == "paper" and is_weight_mean_eligible(module, min_fan_in, dense_only):
                variance = 2 / ((n - 1) * (1 - 1 / math.pi))
            elif rule == "official" and not residual and module.groups == 1:
                variance = OFFICIAL_STRAIGHT_VARIANCE / n
            else:
                variance = 2 / n
        elif isinstance(module, nn.Linear):
            variance = 2 / module.in_features
        else:
            continue
        module.weight.normal_(0, math.sqrt(variance))
        if module.bias is not None:
            module.bias.zero_()


def add_last_batchnorm(model: nn.Module) -> None:
    """Wrap timm's classifier (``get_classifier()``, wherever the family keeps it) with the last BN."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    num_classes = getattr(model, "num_classes", 0)
    if classifier is None or isinstance(classifier, nn.Identity) or not num_classes:
        raise UserError(f"mimicnorm: {type(model).__name__} has no classifier for the last BN (num_classes=0?)")
    name = next(name for name, module in model.named_modules() if module is classifier)
    set_submodule(model, name, ClassifierWithLastBN(classifier, num_classes))


@register_normalizer("mimicnorm")
class MimicNorm(Normalizer):
    """Weight mean after every step plus one BatchNorm1d on the logits; no intermediate BatchNorm."""

    has_batch_statistics = True
    micro_batches_in_one_pass = True

    def __init__(self, min_fan_in: int = 50, residual_scale_init: Literal["official", "paper"] = "official",
                 init: Literal["official", "paper"] = "official", last_bn: bool = True,
                 dense_only: bool = False) -> None:
        """
        Args:
            min_fan_in: weight mean applies to convs with ``in*kh*kw/groups`` above this (at least 1).
            residual_scale_init: ``official`` (1.2**m / l) or ``paper`` (1/sqrt(l)).
            init: ``official`` (He fan-in; 2.8/fan_in for straight nets) or ``paper`` (Theorem 3).
            last_bn: add the BatchNorm1d on the logits; ``False`` is the weight-mean-only ablation.
            dense_only: project ``groups == 1`` convs only (stricter than the official CIFAR filter).
        """
        if min_fan_in < 1:
            raise UserError(f"mimicnorm: min_fan_in must be at least 1 (a single weight has no mean), got {min_fan_in}")
        for option, value in (("residual_scale_init", residual_scale_init), ("init", init)):
            if value not in ("official", "paper"):
                raise UserError(f"mimicnorm: {option} must be 'official' or 'paper', got {value!r}")
        self.min_fan_in = min_fan_in
        self.residual_scale_init = residual_scale_init
        self.init = init
        self.last_bn = last_bn
        self.dense_only = dense_only

    def apply(self, model: nn.Module) -> nn.Module:
        fed = conv_feeding_each_batchnorm(model)
        missing = [name for name, _ in batchnorm_modules(model) if name not in fed]
        if missing:
            raise UserError(f"mimicnorm: BatchNorm {missing[0]} does not directly follow a conv (pre-activation "
                            "layout), so no conv can take over its bias")
        branch_scales = residual_block_scales(model, fed, self.residual_scale_init)

        def remove(name: str, bn: nn.BatchNorm2d) -> nn.Module:
            conv = fed[name]
            if conv.bias is None:
                conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
            return BranchScale(branch_scales[name]) if name in branch_scales else nn.Identity()

        replace_batchnorms(model, remove)
        if self.last_bn:
            add_last_batchnorm(model)
        initialize(model, self.init, residual=bool(branch_scales), min_fan_in=self.min_fan_in,
                   dense_only=self.dense_only)
        project_weights(model, self.min_fan_in, self.dense_only)
        return model

    def after_step(self, model: nn.Module) -> None:
        project_weights(model, self.min_fan_in, self.dense_only)


__all__ = ["BranchScale", "ClassifierWithLastBN", "MimicNorm", "project_weights"]
