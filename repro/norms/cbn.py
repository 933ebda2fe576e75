"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021): BN statistics pooled over the last k iterations.

Statistics of earlier iterations were computed under earlier weights; CBN moves them to the current weights of
the convolution that feeds the BN with a first-order Taylor term in that weight only (paper_numbers.md §3c):

    μ_{t−τ}(W_t) ≈ μ_{t−τ} + ρ·Σ ∂μ_{t−τ}/∂W ⊙ (W_t − W_{t−τ}),   likewise for ν = E[y²].

Design decisions (see also the class docstrings):

* The gradients are computed in closed form, not with autograd: μ_c is linear in filter c, so ∂μ_c/∂W_c is the
  mean input patch (two strided sums of the batch-summed input), and ∂ν_c/∂W_c = E[2·y_c·patch] is the conv's own
  weight gradient for grad_output 2y/M (one ``convolution_backward``). The official code runs two autograd
  backward passes through the conv with a retained graph instead. Extra cost per layer and step: one
  weight-gradient convolution (on CPU about half the cost of the conv's whole backward) plus one batched product
  of the stored gradients with the current weight; ``repro.train.timing.measure_step_time`` measures it.
* Σ ∂ν/∂W ⊙ (W_t − W_{t−τ}) is evaluated as ⟨∂ν/∂W, W_t⟩ − ⟨∂ν/∂W, W_{t−τ}⟩, so no copies of old weights are
  kept; the second term needs no product at all: with y_c = ⟨W_c, patch⟩ + b_c it is 2·(ν_c − b_c·μ_c), and
  ⟨∂μ_c/∂W_c, W_{t−τ}⟩ is μ_c − b_c.
* Few operations per layer, whatever the window or the number of micro-batches: each layer keeps its windows in
  fixed tensors written in turn (``_Windows``), and the batch moments, the pooling and the normalization are one
  autograd function with a closed-form backward pass (``_PooledBatchNorm``; one BatchNorm inference kernel
  normalizes a single group).
* Biased variance in every path (ν − μ² in the window, like ``nn.BatchNorm2d`` outside it); the official plain-BN
  path normalizes with the unbiased one. Running statistics are BN's (current batch, unbiased variance).
* Past statistics are constants for backpropagation; gradients flow through the current batch's statistics.
* One window per micro-batch position within an optimizer step, so that the one-process micro-batch simulation
  keeps exactly the statistics each data-parallel rank would keep.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repro.errors import UserError
from repro.norms.base import (
    Normalizer,
    batchnorm_modules,
    conv_feeding_each_batchnorm,
    register_normalizer,
    replace_batchnorms,
    running_average_factor,
    update_running_statistics_in_order,
)


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


class _PooledBatchNorm(torch.autograd.Function):
    """Each group of images (``(G·m, C, H, W)``, micro-batches) normalized with its channel statistics pooled with
    its past iterations' compensated μ and ν (constants, ``(G, stored, C)``; None: no pooling), then scaled by γ
    and shifted by β. Also returns the groups' own batch mean and biased variance (``(G, C)``, not
    differentiable), which the running statistics and the window take.

    Pooling: past entries whose ν − μ² is negative are dropped per channel; μ̄ is the mean of the kept μ (the
    current batch's always kept) and σ̄² the mean of the kept ν minus μ̄², written as a sum of non-negative terms:
    Σ (σ² + (μ − μ̄)²) / n. std = √(σ̄² + eps) (BN's) or √σ̄² + eps (the official CBN's).

    One function, so that the batch moments, the pooling and the normalization take few operations (on a GPU each
    is a launch): its backward is their chain in closed form, ∂L/∂y = g·γ/std + y·slope + offset per group and
    channel, where with T = Σg·γ/std, Q = (γ/std)·(∂std/∂σ̄²)·∂L/∂γ and n the kept count, slope = −2Q/(nM) and
    offset = (2Q·μ̄ − T)/(nM) (the current batch's own mean cancels out; σ̄² is stationary in μ̄)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, groups: int, past_means: torch.Tensor | None,
                past_mean_squares: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                eps_inside_sqrt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grouped = y.unflatten(0, (groups, -1)).to(torch.promote_types(y.dtype, torch.float32))
        mean_now, var_now = _batch_moments(grouped)
        if past_means is None:
            mean, var, per_count = mean_now, var_now, None
        else:
            means = torch.cat((mean_now[:, None], past_means), 1)  # (G, 1 + stored, C)
            variances = torch.cat((var_now[:, None], torch.addcmul(past_mean_squares, past_means, past_means,
                                                                   value=-1)), 1)
            kept = variances >= 0
            per_count = kept.sum(1, dtype=means.dtype).reciprocal_()
            mean = torch.where(kept, means, 0.0).sum(1).mul_(per_count)
            deviations = means - mean[:, None]
            var = torch.where(kept, torch.addcmul(variances, deviations, deviations), 0.0).sum(1).mul_(per_count)
        if eps_inside_sqrt:
            std = (var + eps).sqrt()
            std_per_var = std.reciprocal().mul_(0.5)  # ∂std/∂σ̄²
        else:  # the clamp gives a zero-variance channel a zero, not an infinite, derivative through the sqrt
            root = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
            std = root + eps
            std_per_var = torch.where(var > 0, root.reciprocal().mul_(0.5), 0.0)
        scale = weight / std
        ctx.save_for_backward(y, mean, std, scale, std_per_var, per_count, weight)
        ctx.mark_non_differentiable(mean_now, var_now)
        ctx.set_materialize_grads(False)  # no zeros made for the statistics' gradients, which are never used
        if groups == 1:  # BatchNorm's fused inference kernel, with std² as the running variance and eps 0
            out = torch.batch_norm(y, weight, bias, mean[0], std[0].square(), False, 0.0, 0.0,
                                   torch.backends.cudnn.enabled)
            return out, mean_now, var_now
        shift = torch.addcmul(bias, mean, scale, value=-1)
        out = torch.empty_like(y)  # written through a grouped view, so that the output is no view itself
        torch.addcmul(_grouped(shift), grouped, _grouped(scale), out=out.unflatten(0, (groups, -1)))
        return out, mean_now, var_now

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_mean_now: None, _grad_var_now: None
                 ) -> tuple[torch.Tensor | None, ...]:
        if grad_out is None:  # only the statistics were used
            return (None,) * 8
        y, mean, std, scale, std_per_var, per_count, weight = ctx.saved_tensors
        groups, channels = mean.shape
        if groups == 1:
            grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out, y, weight, mean[0], std[0].square(), None, None, False, 0.0, [True, True, True])
            grad_weight, grad_bias = grad_weight[None], grad_bias[None]  # Σ g·x̂ and Σ g per group
        else:
            grad_grouped, y_grouped = grad_out.unflatten(0, (groups, -1)), y.unflatten(0, (groups, -1))
            grad_bias = grad_grouped.sum((1, 3, 4), dtype=mean.dtype)
            grad_times_y = (grad_grouped * y_grouped).sum((1, 3, 4), dtype=mean.dtype)
            grad_weight = torch.addcmul(grad_times_y, mean, grad_bias, value=-1).div_(std)
        values = y.numel() // (groups * channels)
        mean_pull = scale * grad_bias  # T = −∂L/∂μ̄
        spread_pull = scale * std_per_var * grad_weight  # Q = −∂L/∂σ̄²
        if per_count is not None:
            mean_pull, spread_pull = mean_pull * per_count, spread_pull * per_count
        slope = spread_pull * (-2.0 / values)
        offset = torch.addcmul(mean_pull, spread_pull, mean, value=-2).mul_(-1.0 / values)
        if groups == 1:
            grad_y = grad_y.addcmul_(y, _grouped(slope)[0]).add_(_grouped(offset)[0])
        else:
            grad_y = torch.empty_like(y)
            torch.addcmul(_grouped(offset), y_grouped, _grouped(slope), out=grad_y.unflatten(0, (groups, -1)))
            grad_y.unflatten(0, (groups, -1)).addcmul_(grad_grouped, _grouped(scale))
        return grad_y, None, None, None, grad_weight.sum(0), grad_bias.sum(0), None, None


def _batch_moments(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and biased variance of each group of ``(G, m, C, H, W)``: one ``var_mean`` on accelerators,
    two passes on the CPU, where ``var_mean`` over these dimensions is ten times slower."""
    if grouped.device.type == "cpu":
        mean = grouped.mean((1, 3, 4))
        return mean, (grouped - mean[:, None, :, None, None]).square().mean((1, 3, 4))
    var, mean = torch.var_mean(grouped, (1, 3, 4), correction=0)
    return mean, var


def _grouped(per_group: torch.Tensor) -> torch.Tensor:
    """A ``(G, C)`` statistic shaped to broadcast over the grouped ``(G, m, C, H, W)`` view of a batch."""
    return per_group[:, None, :, None, None]


class _Windows:
    """The last ``capacity`` iterations of every micro-batch position of one layer, in tensors allocated once and
    overwritten in turn (a ring per position). Compensating or storing any number of positions is then a fixed
    handful of batched operations, not a few per position and stored iteration; storing copies only what is new.

    Layouts are ``(P, capacity, …)``, so that what one iteration stores is one contiguous block per position, which
    the step writes in place: statistics ``(P, capacity, 4, C)`` (μ, ν, and their Taylor terms' products with the
    weight they were stored under, ⟨mean patch, W_τ⟩ and ⟨∂ν/∂W, W_τ⟩), mean patches ``(P, capacity, conv groups,
    K)``, ∂ν/∂W ``(P, capacity, C, K)``, with K = C_in/conv groups·kh·kw. Positions that go through one forward
    together (one pass over the micro-batches) are filled in step, so they share their fill level and next slot.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.stored: list[int] = []  # iterations stored so far, per position
        self.statistics: torch.Tensor | None = None
        self.mean_patches: torch.Tensor | None = None
        self.mean_square_grad: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return len(self.stored)

    def add_position(self) -> None:
        self.stored.append(0)

    def ring_state(self, position: int) -> tuple[int, int]:
        """The position's filled slots and the slot its next iteration overwrites."""
        stored = self.stored[position]
        return min(stored, self.capacity), stored % self.capacity

    def _shared_ring_state(self, first: int, count: int) -> tuple[int, int]:
        states = {self.ring_state(position) for position in range(first, first + count)}
        if len(states) > 1:  # the micro-batch count changed between steps
            raise RuntimeError("CBN windows of different lengths within one iteration; use the sequential path")
        return states.pop()

    def _allocate(self, like: torch.Tensor, channels: int, taylor_shape: tuple[int, int] | None) -> None:
        """Room for every position so far (positions appear in the first iterations only)."""
        grow = self.positions - (0 if self.statistics is None else self.statistics.shape[0])
        if grow <= 0:
            return

        def extended(old: torch.Tensor | None, shape: tuple[int, ...], dim: int) -> torch.Tensor:
            new = like.new_zeros(shape)
            return new if old is None else torch.cat((old, new), dim)

        self.statistics = extended(self.statistics, (grow, self.capacity, 4, channels), 0)
        if taylor_shape is not None:
            conv_groups, patch_size = taylor_shape
            self.mean_patches = extended(self.mean_patches, (grow, self.capacity, conv_groups, patch_size), 0)
            self.mean_square_grad = extended(self.mean_square_grad, (grow, self.capacity, channels, patch_size), 0)

    def _oldest_first(self, per_slot: torch.Tensor, filled: int, next_slot: int) -> torch.Tensor:
        """``(positions, capacity, …)`` → the filled slots, oldest iteration first."""
        if filled < self.capacity:
            return per_slot[:, :filled]
        return per_slot.roll(-next_slot, 1) if next_slot else per_slot

    def _weight_products(self, weight: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """⟨W_c, mean patch⟩ and ⟨W_c, ∂ν_c/∂W_c⟩ of every slot of ``count`` positions, ``(count, slots, C)``."""
        patches = self.mean_patches[first:first + count].flatten(0, 1)  # (count·slots, conv groups, K)
        grads = self.mean_square_grad[first:first + count].flatten(0, 1)  # (count·slots, C, K)
        conv_groups, channels = patches.shape[1], grads.shape[1]
        per_group = weight.reshape(conv_groups, channels // conv_groups, -1)
        mean_shift = torch.bmm(per_group, patches.permute(1, 2, 0))
        # each channel's weight as a row times its gradients as columns: on the CPU 7x faster than the
        # gradients times the weight as a column, a batched matrix-vector product
        mean_square_shift = torch.bmm(weight.reshape(channels, 1, -1), grads.permute(1, 2, 0))
        shape = (channels, count, -1)
        return mean_shift.reshape(shape).permute(1, 2, 0), mean_square_shift.reshape(shape).permute(1, 2, 0)

    def compensated(self, weight: torch.Tensor, rho: float, first: int, count: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and ν of the stored iterations of positions ``first …`` moved to ``weight`` by ρ times their Taylor
        terms: two ``(count, stored iterations, C)`` tensors, oldest first."""
        filled, next_slot = self._shared_ring_state(first, count)
        if not filled:
            empty = weight.new_zeros(count, 0, weight.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32))
            return empty, empty
        statistics = self.statistics[first:first + count]
        moments = statistics[:, :, :2]  # μ and ν, (count, slots, 2, C)
        if rho:  # both moments moved in one pass: stored + ρ·(⟨·, W⟩ − ⟨·, W_τ⟩)
            shifts = torch.stack(self._weight_products(weight.to(statistics.dtype), first, count), 2)
            moments = torch.add(moments, shifts - statistics[:, :, 2:], alpha=rho)
        moments = self._oldest_first(moments, filled, next_slot)
        return moments[:, :, 0], moments[:, :, 1]

    def next_slots(self, first: int, count: int, like: torch.Tensor, weight_shape: torch.Size,
                   conv_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The slots that the next iteration of positions ``first …`` goes into, as views to fill before
        ``advance``: statistics ``(count, 4, C)`` and, when compensating (``conv_groups`` given), the mean patches
        ``(count, conv groups, K)`` and ∂ν/∂W ``(count, *weight_shape)``. Writing results straight into them saves
        copying weight-sized tensors."""
        _, slot = self._shared_ring_state(first, count)
        patch_size = weight_shape[1:].numel()
        self._allocate(like, weight_shape[0], None if conv_groups is None else (conv_groups, patch_size))
        statistics = self.statistics[first:first + count, slot]
        if conv_groups is None:
            return statistics, None, None
        patches = self.mean_patches[first:first + count, slot]
        grads = self.mean_square_grad[first:first + count, slot].unflatten(2, weight_shape[1:])
        return statistics, patches, grads

    def advance(self, first: int, count: int) -> None:
        """Count the iteration written into ``next_slots`` as stored."""
        for position in range(first, first + count):
            self.stored[position] += 1

    def append(self, first: int, means: torch.Tensor, mean_squares: torch.Tensor, weight_shape: torch.Size,
               taylor: tuple[torch.Tensor, ...] | None = None) -> None:
        """Store one iteration of positions ``first …`` (``means``: ``(count, C)``). When compensating, ``taylor``
        holds the mean patches ``(count, conv groups, K)``, ∂ν/∂W ``(count, *weight_shape)`` and their products
        with the weight they were computed under, ``(count, C)`` each."""
        count = means.shape[0]
        conv_groups = None if taylor is None else taylor[0].shape[1]
        statistics, patches, grads = self.next_slots(first, count, means, weight_shape, conv_groups)
        if taylor is None:
            statistics[:, :2] = torch.stack((means, mean_squares), 1)
        else:
            mean_patches, mean_square_grads, *products = taylor
            statistics.copy_(torch.stack((means, mean_squares, *products), 1))
            patches.copy_(mean_patches)
            grads.copy_(mean_square_grads.reshape(grads.shape))  # a saved state holds them flattened
        self.advance(first, count)

    def entries(self, position: int) -> list[dict[str, Any]]:
        """The stored iterations of one position, oldest first, as plain tensors (a resumable run's state)."""
        filled, next_slot = self.ring_state(position)
        if not filled:
            return []
        one = slice(position, position + 1)
        statistics = self._oldest_first(self.statistics[one], filled, next_slot)[0]
        taylor = self.mean_patches is not None
        if taylor:
            patches = self._oldest_first(self.mean_patches[one], filled, next_slot)[0]
            grads = self._oldest_first(self.mean_square_grad[one], filled, next_slot)[0]
        return [{"mean": statistics[k, 0].clone(), "mean_square": statistics[k, 1].clone(),
                 "taylor": None if not taylor else {
                     "mean_patches": patches[k].clone(), "mean_square_grad": grads[k].clone(),
                     "mean_patches_dot_weight": statistics[k, 2].clone(),
                     "mean_square_grad_dot_weight": statistics[k, 3].clone()}}
                for k in range(filled)]


class CrossIterationBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes with statistics pooled over the current and the last ``window − 1`` iterations.

    ``conv`` is the convolution whose output this layer normalizes; it is referenced, not registered as a
    submodule (its weight belongs to its block), and a forward hook on it hands its input and output to this layer.

    * Iterations are optimizer steps: call ``end_iteration()`` after each step (the ``cbn`` normalizer's
      ``after_step`` does). The k-th training forward of an iteration is micro-batch k and pools with micro-batch
      k of the earlier iterations, like rank k of a data-parallel run.
    * Past iterations are compensated with ``rho`` times the Taylor term (``rho=0``: naive average); entries whose
      compensated variance ν − μ² is negative are dropped per channel; μ̄ = mean of the kept μ and
      σ̄² = mean of the kept ν − μ̄² (the official code's aggregation).
    * Plain BN (batch statistics only) until ``burnin_iterations`` iterations have ended, in eval mode
      (running statistics), and whenever the conv weight is not being trained (no grad, or frozen).
    * ``eps_inside_sqrt=False`` (the official default) divides by √σ² + eps instead of BN's √(σ² + eps); with
      ``eps_inside_sqrt=True`` every plain-BN path is ``nn.BatchNorm2d`` itself.
    * The windows are Python state, not part of the state dict; they refill after a restart, as in the official
      code. Memory: (window − 1) conv-weight-sized gradients per micro-batch position.
    """

    def __init__(self, num_features: int, conv: nn.Conv2d, window: int = 4, rho: float = 1.0,
                 burnin_iterations: int | None = 0, eps_inside_sqrt: bool = False, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if type(conv) is not nn.Conv2d or conv.out_channels != num_features:
            raise ValueError(f"CrossIterationBatchNorm2d({num_features}) needs a plain nn.Conv2d with as many "
                             f"output channels, got {conv}")
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError(f"CrossIterationBatchNorm2d needs a conv with numeric zero padding, got {conv}")
        object.__setattr__(self, "conv", conv)  # a plain reference: registering it would duplicate its parameters
        conv.register_forward_hook(self._remember_conv_call)
        self.window = window
        self.rho = rho  # fixed: with rho = 0 no gradients are stored that a later rho could use
        self.burnin_iterations = burnin_iterations
        self.eps_inside_sqrt = eps_inside_sqrt
        self.iterations_done = 0
        self._micro_batch = 0
        self._weight_version_this_iteration = -1
        self._windows = _Windows(window - 1)
        self._conv_call: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output) of the conv's last call

    def training_state(self) -> dict[str, Any]:
        """Iteration count and the stored past iterations, which a resumed run continues from."""
        return {"iterations_done": self.iterations_done,
                "windows": [self._windows.entries(p) for p in range(self._windows.positions)]}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.iterations_done = state["iterations_done"]
        self._micro_batch = 0
        device = self.conv.weight.device
        self._windows = _Windows(self.window - 1)
        for position, entries in enumerate(state["windows"]):
            self._windows.add_position()
            for past in entries:
                taylor = past["taylor"]
                on_device = [tensor.to(device)[None] for tensor in (past["mean"], past["mean_square"], *(
                    () if taylor is None else (taylor["mean_patches"], taylor["mean_square_grad"],
                                               taylor["mean_patches_dot_weight"],
                                               taylor["mean_square_grad_dot_weight"])))]
                self._windows.append(position, on_device[0], on_device[1], self.conv.weight.shape,
                                     tuple(on_device[2:]) or None)

    def end_iteration(self) -> None:
        """Mark an optimizer step: counts towards the burn-in and restarts the micro-batch numbering."""
        self.iterations_done += 1
        self._micro_batch = 0

    def uses_window(self) -> bool:
        """Whether a training forward now pools statistics across iterations (else it is plain BN)."""
        if self.burnin_iterations is None:
            raise RuntimeError("burn-in given in epochs but never converted: the trainer calls the normalizer's "
                               "before_training(model, steps_per_epoch) first")
        return (self.window > 1 and self.iterations_done >= self.burnin_iterations and torch.is_grad_enabled()
                and self.conv.weight.requires_grad)

    def compensated_past_statistics(self, micro_batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and ν of the stored earlier iterations of ``micro_batch``, moved to the current conv weight.

        Returns two (stored iterations, C) tensors, oldest first.
        """
        if micro_batch >= self._windows.positions:
            dtype = torch.promote_types(self.conv.weight.dtype, torch.float32)
            empty = self.conv.weight.new_zeros(0, self.num_features, dtype=dtype)
            return empty, empty
        means, mean_squares = self._windows.compensated(self.conv.weight.detach(), self.rho, micro_batch, 1)
        return means[0], mean_squares[0]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(y)
        if self.training and self.uses_window():
            return self._pooled_forward(y, groups=1)
        if self.eps_inside_sqrt:
            return super().forward(y)
        if self.training or self.running_mean is None:
            out, mean, var = self._batch_norm(y, 1)
            self._update_running_statistics(mean[0], var[0], y)
            return out
        std = self.running_var.clamp_min(torch.finfo(self.running_var.dtype).tiny).sqrt() + self.eps
        return F.batch_norm(y, self.running_mean, std.square(), self.weight, self.bias, False, 0.0, 0.0)

    def ghost_forward(self, y: torch.Tensor, micro_batch: int, side_by_side: bool = True) -> torch.Tensor:
        """Training forward over ``G`` consecutive micro-batches in one pass (``repro.norms.ghost``): group g is
        micro-batch position g of this iteration, pools with its own window and is stored there, exactly as G
        separate forwards would do. Outside the cross-iteration path, the layer's own forward per group.
        ``side_by_side``: per-group work in one kernel with the groups as channels (``statistics_gradients``)."""
        if not self.uses_window():
            return torch.cat([self.forward(chunk) for chunk in y.split(micro_batch)])
        self._check_input_dim(y)
        return self._pooled_forward(y, y.shape[0] // micro_batch, side_by_side)

    def _remember_conv_call(self, conv: nn.Conv2d, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.training and self.uses_window():
            self._conv_call = (args[0], output)

    def _pooled_forward(self, y: torch.Tensor, groups: int, side_by_side: bool = True) -> torch.Tensor:
        """Group g of ``y`` is the next micro-batch of this iteration: it is normalized with its statistics pooled
        with its own window's (compensated) ones, and stored there."""
        conv_call, self._conv_call = self._conv_call, None
        if conv_call is None or conv_call[1] is not y:
            raise RuntimeError(f"CrossIterationBatchNorm2d must be applied to the output of its {self.conv} directly, "
                               "once per call of the conv")
        values_per_channel = y.shape[0] // groups * y.shape[2] * y.shape[3]
        if values_per_channel <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {y.shape[0] // groups} "
                             f"images of {tuple(y.shape[1:])}")
        first = self._start_micro_batch()
        for _ in range(groups - 1):
            self._start_micro_batch()
        with torch.no_grad():
            past_means, past_mean_squares = self._windows.compensated(self.conv.weight.detach(), self.rho, first,
                                                                      groups)  # (G, stored iterations, C)
        out, mean_now, var_now = self._batch_norm(y, groups, past_means, past_mean_squares)  # (G, C) statistics
        if groups == 1:
            self._update_running_statistics(mean_now[0], var_now[0], y)
        elif self.running_mean is not None:
            update_running_statistics_in_order(self, mean_now, var_now, values_per_channel)
        self._store(first, conv_call[0], y, mean_now, var_now, side_by_side)
        return out

    def _start_micro_batch(self) -> int:
        """Number this forward within the iteration; weights changing mid-iteration mean end_iteration() is missing."""
        version = self.conv.weight._version
        if self._micro_batch == 0:
            self._weight_version_this_iteration = version
        elif version != self._weight_version_this_iteration:
            raise RuntimeError("the conv weight changed since this iteration's first forward: call end_iteration() "
                               "after every optimizer step (the 'cbn' normalizer's after_step does)")
        micro_batch = self._micro_batch
        self._micro_batch += 1
        while self._windows.positions <= micro_batch:
            self._windows.add_position()
        return micro_batch

    @torch.no_grad()
    def _store(self, first: int, x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
               side_by_side: bool) -> None:
        """Store each group's statistics (and Taylor terms) in the windows of positions ``first …``."""
        mean_squares = variances + means**2
        weight_shape = self.conv.weight.shape
        if not self.rho:
            self._windows.append(first, means, mean_squares, weight_shape)
            return
        count = means.shape[0]
        statistics, *slots = self._windows.next_slots(first, count, means, weight_shape, self.conv.groups)
        dtype = torch.promote_types(y.dtype, torch.float32)
        statistics_gradients(self.conv, x.to(dtype), y.to(dtype), count, side_by_side, out=tuple(slots))
        # their products with the weight they came from, in closed form: y_c = ⟨W_c, patch⟩ + b_c, so
        # ⟨W_c, mean patch⟩ = μ_c − b_c and ⟨W_c, ∂ν_c/∂W_c⟩ = E[2·y_c·(y_c − b_c)] = 2·(ν_c − b_c·μ_c)
        if self.conv.bias is None:
            products = (means, 2 * mean_squares)
        else:
            bias = self.conv.bias.detach().to(dtype)
            products = (means - bias, 2 * (mean_squares - bias * means))
        statistics.copy_(torch.stack((means, mean_squares, *products), 1))
        self._windows.advance(first, count)

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> None:
        """BN's update from the current batch alone, with the unbiased variance."""
        if not self.training:
            return
        count = y.numel() // y.shape[1]
        if count <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got input {tuple(y.shape)}")
        if self.running_mean is None:
            return
        factor = running_average_factor(self)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)

    def _batch_norm(self, y: torch.Tensor, groups: int, past_means: torch.Tensor | None = None,
                    past_mean_squares: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``_PooledBatchNorm`` with this layer's γ and β (ones and zeros without them)."""
        dtype = torch.promote_types(y.dtype, torch.float32)
        if self.affine:
            weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        else:
            weight = torch.ones(self.num_features, dtype=dtype, device=y.device)
            bias = torch.zeros_like(weight)
        return _PooledBatchNorm.apply(y, groups, past_means, past_mean_squares, weight, bias, self.eps,
                                      self.eps_inside_sqrt)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, rho={self.rho}, "
                f"burnin_iterations={self.burnin_iterations}, eps_inside_sqrt={self.eps_inside_sqrt}")


@register_normalizer("cbn")
class CrossIterationBatchNorm(Normalizer):
    """CBN in place of every BatchNorm, each paired with the conv whose output it normalizes (found by tracing a
    forward pass, so timm ResNets and the MobileNet/EfficientNet families with depthwise convs both work).

    ``window`` k counts the current iteration (the official ``buffer_num=3`` is k = 4). The burn-in of plain BN is
    ``burnin_iterations`` optimizer steps, or ``burnin_epochs`` epochs converted with the trainer's optimizer steps
    per epoch (global batches, also in data-parallel runs) as the official ``tools/train.py`` intends; give one.
    """

    has_batch_statistics = True
    micro_batches_in_one_pass = True

    def __init__(self, window: int = 4, rho: float = 1.0, burnin_iterations: int = 0,
                 burnin_epochs: float | None = None, eps_inside_sqrt: bool = False, momentum: float = 0.1,
                 eps: float = 1e-5) -> None:
        if window < 1 or rho < 0 or burnin_iterations < 0 or (burnin_epochs is not None and burnin_epochs < 0):
            raise UserError("cbn: window must be >= 1 and rho, burnin_iterations, burnin_epochs >= 0")
        if burnin_epochs is not None and burnin_iterations:
            raise UserError("cbn: give the burn-in either as burnin_iterations or as burnin_epochs, not both")
        self.burnin_epochs = burnin_epochs
        self.layer_options = {"window": window, "rho": rho, "eps_inside_sqrt": eps_inside_sqrt,
                              "momentum": momentum, "eps": eps,
                              "burnin_iterations": None if burnin_epochs is not None else burnin_iterations}

    def apply(self, model: nn.Module) -> nn.Module:
        convs = {name: conv for name, conv in conv_feeding_each_batchnorm(model).items() if type(conv) is nn.Conv2d}
        unpaired = [name for name, _ in batchnorm_modules(model) if name not in convs]
        if unpaired:
            shown = ", ".join(unpaired[:3]) + (f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else "")
            raise UserError(f"{self.name}: no nn.Conv2d directly before BatchNorm {shown}; CBN compensates "
                            "statistics through the weights of the conv that feeds each BatchNorm")

        def make(name: str, bn: nn.BatchNorm2d) -> nn.Module:
            cbn = CrossIterationBatchNorm2d(bn.num_features, convs[name], affine=bn.affine,
                                            track_running_stats=bn.track_running_stats, **self.layer_options)
            cbn.load_state_dict(bn.state_dict())
            return cbn

        replace_batchnorms(model, make)
        return model

    def before_training(self, model: nn.Module, steps_per_epoch: int) -> None:
        if self.burnin_epochs is not None:
            for module in _cbn_modules(model):
                module.burnin_iterations = self._burnin_iterations(steps_per_epoch)

    def _burnin_iterations(self, steps_per_epoch: int) -> int:
        if self.burnin_epochs is None:
            return self.layer_options["burnin_iterations"]
        return round(self.burnin_epochs * steps_per_epoch)

    def after_step(self, model: nn.Module) -> None:
        for module in _cbn_modules(model):
            module.end_iteration()

    def step_pattern(self, steps_per_epoch: int) -> tuple[int, int]:
        """Plain BN through the burn-in, then the windows fill; full, they hold ``window - 1`` past iterations
        and cycle through them."""
        window = self.layer_options["window"]
        return self._burnin_iterations(steps_per_epoch) + window + 1, max(window - 1, 1)


@register_normalizer("cbn_naive")
class NaiveCrossIterationBatchNorm(CrossIterationBatchNorm):
    """The paper's "naive CBN" baseline: past statistics averaged without compensation (ρ = 0)."""

    def __init__(self, window: int = 4, burnin_iterations: int = 0, burnin_epochs: float | None = None,
                 eps_inside_sqrt: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__(window, 0.0, burnin_iterations, burnin_epochs, eps_inside_sqrt, momentum, eps)


def _cbn_modules(model: nn.Module) -> list[CrossIterationBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
