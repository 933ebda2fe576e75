"""timm's own normalization layers in place of every BatchNorm, built through timm's layer factories.

A plain norm (``LayerNorm2d``, ``GroupNorm1``) takes the BatchNorm's place and the network's activations stay.
A norm-act layer (EvoNorm, FRN with TLU) brings its own nonlinearity, as in the papers: where a BatchNorm feeds an
activation directly, the layer applies its nonlinearity and that activation becomes an identity; where it does not
(the last norm of a residual branch, a projection shortcut) the layer runs without it (``apply_act=False``), as
timm's own norm-act networks build them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.layers import BatchNormAct2d, create_norm_act_layer, create_norm_layer
from torch import nn

from repro.errors import UserError
from repro.norms.base import (
    Normalizer,
    batchnorm_modules,
    copy_affine,
    probe_forward,
    replace_batchnorms,
    set_submodule,
)

#: the activation modules a norm-act layer's own nonlinearity replaces
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish, nn.ELU, nn.Mish)


class TimmNorm(Normalizer):
    """A timm norm layer (``create_norm_layer``) in place of every BatchNorm; the activations are kept."""

    #: the layer's name in timm's norm factory
    timm_layer: ClassVar[str] = ""

    def layer_options(self) -> dict[str, Any]:
        """The keyword arguments timm's layer is built with: every option of this normalizer."""
        return self.options()

    def apply(self, model: nn.Module) -> nn.Module:
        def make(name: str, bn: nn.BatchNorm2d) -> nn.Module:
            layer = create_norm_layer(self.timm_layer, bn.num_features, **self.layer_options())
            copy_affine(bn, layer)
            return layer

        replace_batchnorms(model, make)
        return model


class TimmNormAct(TimmNorm):
    """A timm norm-act layer (``create_norm_act_layer``) in place of every BatchNorm and the activation it feeds."""

    def apply(self, model: nn.Module) -> nn.Module:
        feeds = activation_fed_by_each_batchnorm(model)
        for name, bn in list(batchnorm_modules(model)):
            fused = isinstance(bn, BatchNormAct2d)
            apply_act = not isinstance(bn.act, nn.Identity) if fused else name in feeds
            layer = create_norm_act_layer(self.timm_layer, bn.num_features, apply_act=apply_act,
                                          **self.layer_options())
            copy_affine(bn, layer)
            set_submodule(model, name, nn.Sequential(layer, bn.drop) if fused else layer)
        for activation in feeds.values():
            set_submodule(model, activation, nn.Identity())
        return model


def activation_fed_by_each_batchnorm(model: nn.Module) -> dict[str, str]:
    """Map each (unfused) BatchNorm2d's name to the activation module its output goes into unchanged, found by one
    small eval forward.

    The output must reach the activation as the same tensor at the same version: ``x += shortcut`` in between
    changes it in place, so the last norm of a residual branch feeds no activation. An activation module that is
    also called on other tensors cannot be absorbed: that is a user error naming it.
    """
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}
    calls: dict[str, list[str | None]] = {}

    def remember_output(name: str):
        def hook(_bn: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            outputs[id(output)] = (name, output, output._version)  # kept alive so its id cannot be reused

        return hook

    def record_call(name: str):
        def hook(_activation: nn.Module, inputs: tuple) -> None:
            bn, tensor, version = outputs.get(id(inputs[0]), (None, None, -1))
            fed = tensor is inputs[0] and version == inputs[0]._version
            calls.setdefault(name, []).append(bn if fed else None)

        return hook

    handles = [bn.register_forward_hook(remember_output(name)) for name, bn in batchnorm_modules(model)
               if not isinstance(bn, BatchNormAct2d)]
    fused_parts = {id(m) for _, bn in batchnorm_modules(model) if isinstance(bn, BatchNormAct2d) for m in bn.modules()}
    handles += [module.register_forward_pre_hook(record_call(name)) for name, module in model.named_modules()
                if isinstance(module, ACTIVATIONS) and id(module) not in fused_parts]
    probe_forward(model, handles)
    feeds = {}
    for activation, sources in calls.items():
        fed_by = set(sources)
        if len(fed_by) > 1:
            raise UserError(f"activation {activation} is called on a BatchNorm's output and on other tensors; "
                            "a norm-act layer cannot take its place")
        if fed_by != {None}:
            feeds[sources[0]] = activation
    return feeds
