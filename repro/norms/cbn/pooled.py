"""``_PooledBatchNorm``: batch moments, pooling with the compensated past iterations and normalization as one
autograd function with a closed-form backward pass (few operations per layer, whatever the window)."""

from __future__ import annotations

import torch


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
