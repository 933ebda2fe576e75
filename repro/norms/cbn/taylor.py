"""The Taylor terms' gradients in closed form: ∂μ/∂W (the mean input patch, two strided sums of the
batch-summed input) and ∂ν/∂W (the conv's own weight gradient for grad_output 2y/M), per group of images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def statistics_gradients(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, groups: int = 1,
                         side_by_side: bool = True, out: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of the per-channel mean μ and mean square ν of ``y = conv(x)`` w.r.t. the conv weight,
    for each of ``groups`` equal groups of consecutive images (micro-batches).

    Channel c's statistics depend only on filter c, so only that block of each Jacobian is returned: the mean input
    patch of each conv group, ``(groups, conv.groups, C_in/conv.groups·kh·kw)``, which is ∂μ_c/∂W_c for every output
    channel c of that conv group; and ∂ν/∂W, ``(groups, *weight.shape)``, the weight gradient for grad_output 2y/M.
    ``side_by_side`` computes every group's in one convolution with the groups laid side by side as channels (one
    launch, on accelerators); else one convolution per group (on CPU, where grouped weight gradients are slow).
    ``y`` must include the conv's bias, if any. ``out``: two tensors of these shapes to write the results into (a
    CBN layer's window slots), instead of new ones.
    """
    patches_out, grads_out = out or (None, None)
    x_groups, y_groups = x.unflatten(0, (groups, -1)), y.unflatten(0, (groups, -1))
    count = y_groups.shape[1] * y.shape[2] * y.shape[3]
    summed_patches = _summed_patches(_sum_per_group(x, groups), conv, y.shape[2:]).view(groups, conv.groups, -1)
    mean_patches = torch.div(summed_patches, count, out=patches_out)
    geometry = (conv.stride, conv.padding, conv.dilation)
    if side_by_side and groups > 1:
        folded = [t.transpose(0, 1).flatten(1, 2) for t in (x_groups, y_groups)]
        shape = (groups * conv.out_channels, *conv.weight.shape[1:])
        output_grads = torch.nn.grad.conv2d_weight(folded[0], shape, folded[1], *geometry, groups * conv.groups)
        return mean_patches, torch.mul(output_grads.unflatten(0, (groups, -1)), 2.0 / count, out=grads_out)
    mean_square_grads = x.new_empty((groups, *conv.weight.shape)) if grads_out is None else grads_out
    for group, (x_group, y_group) in enumerate(zip(x_groups, y_groups, strict=True)):
        # conv2d_weight without its placeholder weight, whose layout costs the CPU a reorder per call
        output_grad = torch.ops.aten.convolution_backward(y_group, x_group, conv.weight.detach().to(x.dtype), None,
                                                          *geometry, False, [0, 0], conv.groups,
                                                          (False, True, False))[1]
        torch.mul(output_grad, 2.0 / count, out=mean_square_grads[group])
    return mean_patches, mean_square_grads


def _sum_per_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Σ over the images of each of ``groups`` equal groups, ``(G·m, C, H, W)`` → ``(G, C, H, W)``, as a sum of
    rows in the order the input lies in memory (on the CPU several times faster than the same sum over a strided
    5-d view of a channels-last input)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
        return rows.reshape(groups, -1, rows[0].numel()).sum(1).view(groups, *rows.shape[1:]).permute(0, 3, 1, 2)
    return x.reshape(groups, -1, x[0].numel()).sum(1).view(groups, *x.shape[1:])


def _summed_patches(x: torch.Tensor, conv: nn.Conv2d, out_size: torch.Size) -> torch.Tensor:
    """Σ over output positions of each input patch of ``conv`` on ``x`` (``(G, C_in, H, W)`` → ``(G, C_in, kh,
    kw)``), as two strided sums (rows, then columns) of the padded input instead of materialising every patch."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    rows_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    cols_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (rows_out, cols_out) != tuple(out_size):
        raise RuntimeError(f"the BatchNorm input ({tuple(out_size)}) is not the output of its paired {conv}")
    padded = F.pad(x, (pw, pw, ph, ph)).contiguous()  # the strides below assume a contiguous layout
    groups, channels, height, width = padded.shape
    rows = padded.as_strided((groups, channels, kh, rows_out, width),
                             (channels * height * width, height * width, dh * width, sh * width, 1)).sum(3).contiguous()
    return rows.as_strided((groups, channels, kh, kw, cols_out),
                           (channels * kh * width, kh * width, width, dw, sw)).sum(4)
