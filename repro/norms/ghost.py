"""Micro-batches in one forward: "ghost" batch statistics (Hoffer et al. 2017) that equal separate passes.

The trainer's micro-batch simulation used to run one forward and backward per micro-batch, so a step at micro-batch
2 of a 32-image batch was 16 small passes. For a model whose only batch-coupled layers are plain
``nn.BatchNorm1d``/``nn.BatchNorm2d``, one forward over the whole batch computes the same thing when every such
layer normalizes each consecutive group of ``micro_batch`` samples with that group's own statistics, and updates its
running statistics as the groups' passes would have, one momentum update per group, in order. Losses, gradients and
running statistics then agree with the sequential passes to float rounding (``tests/test_ghost_batches.py``).

Batch Renorm reads its running statistics in training: each group is renormalized against the running statistics
its own pass would see (updated by the groups before it), also in closed form. Cross-Iteration BN pools group g
with the window of micro-batch position g and stores it there (``CrossIterationBatchNorm2d.ghost_forward``; on a
GPU one weight-gradient convolution for all groups). Not exact, so kept sequential by the trainer: random layers
(dropout, drop-path: a whole-batch mask draws other random numbers), and mixup (drawn per chunk).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from repro.norms.base import Normalizer, running_statistics_in_order, update_running_statistics_in_order
from repro.norms.batch_renorm import BatchRenorm2d
from repro.norms.cbn import CrossIterationBatchNorm2d

#: the layers whose training forward this module knows how to split into ghost batches
GHOST_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, BatchRenorm2d, CrossIterationBatchNorm2d)


def grouped_statistics(x: torch.Tensor) -> bool:
    """Whether the ghost groups are normalized by one BatchNorm kernel over the groups laid side by side as
    channels (on accelerators, where a layer's cost is its kernel launches) rather than by the layer's own forward
    per group (on CPU, where the two copies of the side-by-side form cost more than they save; the convolutions
    see the whole batch either way)."""
    return x.device.type != "cpu"


def _ghost_forward(bn: nn.modules.batchnorm._BatchNorm, micro_batch: int, x: torch.Tensor) -> torch.Tensor:
    """``bn`` applied to each consecutive group of ``micro_batch`` samples of ``x`` on its own, in one pass.

    Batch Renorm's r and d are taken against the running statistics as each group's own pass would find them,
    already updated by the groups before it.
    """
    groups = x.shape[0] // micro_batch
    if not bn.training or groups <= 1 or x.shape[0] % micro_batch:
        return type(bn).forward(bn, x)
    if isinstance(bn, CrossIterationBatchNorm2d):  # its windows, one per group
        return bn.ghost_forward(x, micro_batch, side_by_side=grouped_statistics(x))
    if not grouped_statistics(x):  # the layer's own forward per group, in order: the sequential arithmetic itself
        return torch.cat([type(bn).forward(bn, chunk) for chunk in x.split(micro_batch)])
    bn._check_input_dim(x)
    folded = _groups_side_by_side(x, groups)
    values_per_channel = folded.numel() // folded.shape[1]
    if values_per_channel <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[micro_batch, *x.shape[1:]]}")
    scale = bn.weight.expand(groups, -1) if bn.affine else None  # (G, C) views
    shift = bn.bias.expand(groups, -1) if bn.affine else None
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            reduce = (0, *range(2, folded.dim()))
            var, mean = torch.var_mean(folded.to(torch.promote_types(x.dtype, torch.float32)), reduce, correction=0)
            mean, var = mean.view(groups, -1), var.view(groups, -1)
        if isinstance(bn, BatchRenorm2d):  # each group's r and d need the running statistics it would have seen
            unbiased = var * (values_per_channel / (values_per_channel - 1))
            running_means, running_vars = running_statistics_in_order(bn, mean, unbiased)
            r, d = bn.renormalization(mean, var, running_means[:-1], running_vars[:-1])
            scale, shift = (scale * r, shift + scale * d) if bn.affine else (r, d)
        else:
            update_running_statistics_in_order(bn, mean, var, values_per_channel)
    out = F.batch_norm(folded, None, None, None if scale is None else scale.flatten(),
                       None if shift is None else shift.flatten(), True, 0.0, bn.eps)
    return _groups_stacked(out, groups, like=x)


def _groups_side_by_side(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(G·m, C, ...) -> (m, G·C, ...): the groups as channels, so that one BatchNorm kernel normalizes every group.
    One copy; a channels-last input stays channels-last (BatchNorm's channels-last kernel, and one copy back)."""
    micro_batch = x.shape[0] // groups
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        nhwc = x.permute(0, 2, 3, 1).unflatten(0, (groups, micro_batch))  # (G, m, H, W, C), a view
        side_by_side = nhwc.permute(1, 2, 3, 0, 4).reshape(micro_batch, *x.shape[2:], -1)  # (m, H, W, G·C)
        return side_by_side.permute(0, 3, 1, 2)
    return x.unflatten(0, (groups, micro_batch)).transpose(0, 1).flatten(1, 2)


def _groups_stacked(folded: torch.Tensor, groups: int, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_groups_side_by_side``, in the memory format of ``like``."""
    micro_batch = folded.shape[0]
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        nhwc = folded.permute(0, 2, 3, 1).unflatten(3, (groups, -1))  # (m, H, W, G, C)
        stacked = nhwc.permute(3, 0, 1, 2, 4).reshape(groups * micro_batch, *folded.shape[2:], -1)
        return stacked.permute(0, 3, 1, 2)
    return folded.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 1)


def _has_random_layers(model: nn.Module) -> bool:
    """Dropout or drop-path anywhere (modules, or timm's functional head dropout ``drop_rate``)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if getattr(module, "drop_prob", 0) or getattr(module, "drop_rate", 0):
            return True
    return False


def can_run_in_one_pass(model: nn.Module, mixup_alpha: float = 0.0) -> bool:
    """Whether one ghost-batch forward equals the sequential micro-batch passes for ``model``.

    The model's normalizer must declare it (``Normalizer.micro_batches_in_one_pass``), every batch-norm layer must be
    a plain ``GHOST_LAYERS`` one (a subclass may read its running statistics in training), and nothing random may
    draw per sample.
    """
    normalizer = getattr(model, "normalizer", None)
    if not isinstance(normalizer, Normalizer) or not normalizer.micro_batches_in_one_pass or mixup_alpha > 0:
        return False
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return all(type(m) in GHOST_LAYERS for m in batch_norms) and not _has_random_layers(model)


@contextlib.contextmanager
def ghost_batches(model: nn.Module, micro_batch: int) -> Iterator[None]:
    """Within the block, every ``GHOST_LAYERS`` layer of ``model`` in training mode normalizes per ``micro_batch``
    samples (eval-mode forwards are unchanged)."""
    layers = [m for m in model.modules() if type(m) in GHOST_LAYERS]
    for layer in layers:
        layer.forward = lambda x, layer=layer: _ghost_forward(layer, micro_batch, x)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
