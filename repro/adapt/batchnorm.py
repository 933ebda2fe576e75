"""Test-time statistics for BatchNorm layers: the shared machinery of ``ptbn``, ``bn_adapt`` and ``tent``.

Every BN layer that a method adapts is replaced, in the method's private copy of the model, by an
``AdaptedBatchNorm`` that holds the original layer. It normalizes with

    λ = N / (N + n),   μ̄ = λ·μ_source + (1−λ)·μ_batch,   σ̄² = λ·σ²_source + (1−λ)·σ²_batch

(Schneider et al. 2020; n = images in the current batch, N = pseudo sample size of the source statistics),
then applies the layer's own affine parameters (and, for timm's fused ``BatchNormAct2d``, its drop and
activation). N = 0 is prediction-time BN, N = ∞ is the source model.

Why a replacement instead of ``bn.train()``: in train mode a BN overwrites its running statistics, and BN
subclasses (Batch Renorm, Cross-Iteration BN) run their own training-time corrections. The replacement
normalizes every BN-type layer the same way, as plain BN does with batch statistics, and never touches the
source running statistics (they are read, for N > 0, and otherwise left as trained).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from repro.errors import UserError
from repro.norms.base import set_submodule

#: Layers adapted by default: BN over feature maps, including every subclass (timm BatchNormAct2d, Batch Renorm,
#: Cross-Iteration BN). ``BatchNorm1d`` (e.g. MimicNorm's BN on the logits) is adapted only when asked.
SPATIAL_BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def find_batchnorms(model: nn.Module, adapt_1d: bool) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    kinds = (*SPATIAL_BATCHNORMS, nn.BatchNorm1d) if adapt_1d else SPATIAL_BATCHNORMS
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]


def source_weight(pseudo_samples: float, batch_size: int) -> float:
    """λ = N / (N + n): the weight of the source statistics; N = ∞ gives exactly 1."""
    if math.isinf(pseudo_samples):
        return 1.0
    return pseudo_samples / (pseudo_samples + batch_size)


class AdaptedBatchNorm(nn.Module):
    """Normalizes like ``layer`` but with source statistics mixed with the current batch's (weight λ on the source).

    ``unbiased`` picks the batch variance's divisor: m − 1 (the official robusta code, which reads it from a
    momentum-1 BN's running_var) or m (what a BN in train mode normalizes with), m = values per channel
    (n·H·W for a 2d BN). When m = 1 (a BatchNorm1d at batch size 1) a batch has no variance, and PyTorch's
    train-mode BN refuses it; this layer then uses the source statistics for that batch.

    ``group_size`` set (by ``AdaptationMethod.grouped``) makes one forward hold several test batches of that
    size, each normalized with its own statistics: the evaluator's one pass per view for stateless methods.

    ``episode_weight`` and ``episode_bias`` set (E × C, by ``Tent.episodes``) make one forward hold the current
    batch of E independent episodes (views), E equal parts, each normalized with its own statistics and scaled
    by its own episode's affine parameters.
    """

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, pseudo_samples: float, unbiased: bool) -> None:
        super().__init__()
        self.layer = layer
        self.pseudo_samples = pseudo_samples
        self.unbiased = unbiased
        self.group_size: int | None = None  # set: the batch holds independent test batches of this size
        self.episode_weight: torch.Tensor | None = None  # set: one γ (and β) per episode, E × C
        self.episode_bias: torch.Tensor | None = None
        self.episodes: int | None = None  # set: the batch holds E episodes' batches of equal size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.episodes is not None:
            size = x.shape[0] // self.episodes
        else:  # fewer images than a group: the stream's last, partial batch
            size = min(self.group_size or x.shape[0], x.shape[0])
        if x.shape[0] % size:
            raise ValueError(f"{x.shape[0]} images do not split into groups of {size}")
        prior = source_weight(self.pseudo_samples, size)
        if x.numel() == x.shape[1] * x.shape[0] // size:  # one value per channel and group: no batch variance
            prior = 1.0
        count = x.shape[0] // size
        weight, bias = ((self.episode_weight, self.episode_bias) if self.episode_weight is not None
                        else (layer.weight, layer.bias))
        if prior == 0.0 and not self.unbiased and x.ndim > 2:
            # Exactly a BN forward in train mode (differentiable through the batch statistics, as tent needs),
            # without running buffers so nothing is updated. Several groups become channels side by side
            # (size × G·C × ...), so that one fused BN kernel computes every group's statistics.
            if count == 1 and self.episode_weight is None:
                normalized = F.batch_norm(x, None, None, weight, bias, True, 0.0, layer.eps)
            else:
                if weight is not None and weight.ndim == 1:
                    weight, bias = weight.expand(count, -1), bias.expand(count, -1)
                side_by_side = x.unflatten(0, (count, size)).transpose(0, 1).flatten(1, 2)
                normalized = F.batch_norm(side_by_side, None, None, None if weight is None else weight.flatten(),
                                          None if bias is None else bias.flatten(), True, 0.0, layer.eps)
                normalized = normalized.unflatten(1, (count, -1)).transpose(0, 1).flatten(0, 1)
            return layer.act(layer.drop(normalized)) if isinstance(layer, BatchNormAct2d) else normalized
        groups = x.unflatten(0, (-1, size))  # G × size × C × ...
        mean, var = self.statistics(groups, prior)  # G × C each
        scale = torch.rsqrt(var + layer.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        shape = (mean.shape[0], 1, -1) + (1,) * (x.ndim - 2)
        normalized = torch.addcmul(shift.view(shape), groups, scale.view(shape)).flatten(0, 1)  # one pass over x
        return layer.act(layer.drop(normalized)) if isinstance(layer, BatchNormAct2d) else normalized

    def statistics(self, groups: torch.Tensor, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed mean and variance per group and channel (G × C) of ``groups`` (G × n × C × ...), in float32
        (under bf16 autocast too)."""
        if prior > 0.0 and (self.layer.running_mean is None or self.layer.running_var is None):
            raise UserError(f"{type(self.layer).__name__} keeps no running statistics to fall back on or mix with: "
                            "needs N = 0 and more than one value per channel")
        count = groups.shape[0]
        if prior == 1.0:
            return self.layer.running_mean.expand(count, -1), self.layer.running_var.expand(count, -1)
        reduce = [1, *range(3, groups.ndim)]
        batch_var, batch_mean = torch.var_mean(groups.float(), dim=reduce, correction=1 if self.unbiased else 0)
        if prior == 0.0:
            return batch_mean, batch_var
        mean = prior * self.layer.running_mean + (1 - prior) * batch_mean
        var = prior * self.layer.running_var + (1 - prior) * batch_var
        return mean, var

    def extra_repr(self) -> str:
        return f"pseudo_samples={self.pseudo_samples}, unbiased={self.unbiased}"


def adapt_batchnorms(model: nn.Module, *, pseudo_samples: float, unbiased: bool, adapt_1d: bool) -> list[str]:
    """Replace the BN layers of ``model`` (in place) by ``AdaptedBatchNorm``; returns the replaced layers' names."""
    return replace_batchnorms(model, lambda layer: AdaptedBatchNorm(layer, pseudo_samples, unbiased), adapt_1d)


def replace_batchnorms(model: nn.Module, replacement: Callable[[nn.modules.batchnorm._BatchNorm], nn.Module],
                       adapt_1d: bool) -> list[str]:
    """Replace every BN layer of ``model`` (in place) by ``replacement(layer)``; returns the replaced layers' names.

    A model whose normalizer says it keeps batch statistics but that has no BN-type layer at all is an error:
    its statistics live in a layer this code does not know, and falling back to ``source`` would hide that.
    """
    normalizer = getattr(model, "normalizer", None)
    if getattr(normalizer, "has_batch_statistics", False) and not find_batchnorms(model, adapt_1d=True):
        raise UserError(f"normalizer {normalizer.name!r} keeps batch statistics, but the model has no BatchNorm layer "
                        "(or subclass) whose statistics test-time adaptation could replace")
    layers = find_batchnorms(model, adapt_1d)
    for name, layer in layers:
        set_submodule(model, name, replacement(layer))
    return [name for name, _ in layers]


def affine_and_activation(normalized: torch.Tensor, layer: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``layer``'s affine parameters on a normalized input, then (BatchNormAct2d) its drop and activation."""
    if layer.weight is not None:
        shape = (1, -1) + (1,) * (normalized.ndim - 2)
        normalized = normalized * layer.weight.view(shape) + layer.bias.view(shape)
    if isinstance(layer, BatchNormAct2d):
        normalized = layer.act(layer.drop(normalized))
    return normalized


def channel_view(statistic: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``x`` (N × C × ...)."""
    return statistic.view((1, -1) + (1,) * (x.ndim - 2))


@contextmanager
def statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Inside, every layer of ``model`` with an ``update`` flag (running test statistics) leaves them unchanged."""
    layers = [m for m in model.modules() if hasattr(m, "update")]
    for layer in layers:
        layer.update = False
    try:
        yield
    finally:
        for layer in layers:
            layer.update = True
