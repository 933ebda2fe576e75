"""Model factory: a timm backbone, optionally with a CIFAR-style stem, under a registered normalizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from torch import nn

from repro.errors import UserError
from repro.models import cifar_resnet, wide_resnet  # noqa: F401  (register resnet20..110 and wrn28_10 with timm)
from repro.norms import Normalizer, create_normalizer


def _small_input_stem(model: nn.Module) -> None:
    """3x3 stride-1 first conv and no max-pool: the stem the papers use for 28-32 pixel inputs."""
    first_conv = model.pretrained_cfg.get("first_conv")
    if not first_conv:
        raise UserError(f"small_input: timm model {type(model).__name__} does not name its first conv")
    conv = model.get_submodule(first_conv)
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"small_input: first conv {first_conv} of {type(model).__name__} is not a Conv2d")
    parent_name, _, child = first_conv.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    stem = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    setattr(parent, child, stem)
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()


def build_model(
        backbone: str,
        normalizer: str | type[Normalizer] | Callable[..., Normalizer] | Normalizer = "bn",
        *,
        num_classes: int,
        in_chans: int = 3,
        small_input: bool = False,
        pretrained: str | None = None,
        **normalizer_kwargs: Any,
) -> nn.Module:
    """Build ``timm.create_model(backbone)`` and convert it with ``normalizer``.

    Args:
        backbone: a timm model name (``resnet18``, ``resnet50.tv_in1k`` ...).
        normalizer: a registered name, a Normalizer class or partial, or an instance.
        num_classes: classifier outputs.
        in_chans: input channels (1 for Fashion-MNIST).
        small_input: replace the stem by a 3x3 stride-1 conv without max-pool (CIFAR-style).
        pretrained: ``None`` for random init, ``"hub"`` for timm's hub weights, or a local weights file.
        normalizer_kwargs: the normalizer's options (``groups=8`` for ``gn`` ...).

    The returned module carries the normalizer instance as ``model.normalizer`` so the trainer can ask it
    for parameter groups and call its per-step hook.
    """
    norm = create_normalizer(normalizer, **normalizer_kwargs)
    if not timm.is_model(backbone.split(".")[0]):
        raise UserError(f"unknown backbone {backbone!r}; allowed: any timm model name (see timm.list_models())")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if pretrained == "hub":
        kwargs["pretrained"] = True
    elif pretrained is not None:
        if not Path(pretrained).is_file():
            raise UserError(f"pretrained weights file {pretrained} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
    model = timm.create_model(backbone, **kwargs)
    if small_input:
        _small_input_stem(model)
    model = norm.apply(model)
    model.normalizer = norm
    return model
