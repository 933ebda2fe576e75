"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021): BN statistics pooled over the last k iterations.

Statistics of earlier iterations were computed under earlier weights; CBN moves them to the current weights of
the convolution that feeds the BN with a first-order Taylor term in that weight only (paper_numbers.md §3c):

    μ_{t−τ}(W_t) ≈ μ_{t−τ} + ρ·Σ ∂μ_{t−τ}/∂W ⊙ (W_t − W_{t−τ}),   likewise for ν = E[y²].

Design decisions (see also the class docstrings):

* The gradients are computed in closed form, not with autograd: μ_c is linear in filter c, so ∂μ_c/∂W_c is the
  mean input patch (one ``unfold`` of the batch-summed input), and ∂ν_c/∂W_c = E[2·y_c·patch] is the conv's own
  weight gradient for grad_output 2y/M (one ``convolution_backward``). The official code runs two autograd
  backward passes through the conv with a retained graph instead. Extra cost per layer and step: one
  weight-gradient convolution (on CPU about the cost of the conv's whole backward) plus window-many dot products
  over the weight; ``repro.train.timing.measure_step_time`` measures it.
* Σ ∂ν/∂W ⊙ (W_t − W_{t−τ}) is evaluated as ⟨∂ν/∂W, W_t⟩ − ⟨∂ν/∂W, W_{t−τ}⟩ with the second term computed when the
  iteration is stored, so no copies of old weights are kept.
* Biased variance in every path (ν − μ² in the window, like ``nn.BatchNorm2d`` outside it); the official plain-BN
  path normalizes with the unbiased one. Running statistics are BN's (current batch, unbiased variance).
* Past statistics are constants for backpropagation; gradients flow through the current batch's statistics.
* One window per micro-batch position within an optimizer step, so that the one-process micro-batch simulation
  keeps exactly the statistics each data-parallel rank would keep.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repro.errors import UserError
from repro.norms.base import (
    Normalizer,
    batchnorm_modules,
    channel_mean_var,
    conv_feeding_each_batchnorm,
    register_normalizer,
    replace_batchnorms,
    running_average_factor,
    running_statistics_in_order,
)


def statistics_gradients(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of the per-channel mean μ and mean square ν of ``y = conv(x)`` w.r.t. the conv weight.

    Channel c's statistics depend only on filter c, so only that block of each Jacobian is returned:
    the mean input patch of each group, shape (groups, C_in/groups·kh·kw), which is ∂μ_c/∂W_c for every output
    channel c of the group; and ∂ν/∂W with the weight's shape. ``y`` must include the conv's bias, if any.
    """
    positions = y.shape[2] * y.shape[3]
    count = y.shape[0] * positions
    patches = F.unfold(x.sum(0, keepdim=True), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    if patches.shape[-1] != positions:
        raise RuntimeError(f"the BatchNorm input ({tuple(y.shape)}) is not the output of its paired {conv}")
    mean_patches = patches.sum(-1).view(conv.groups, -1) / count
    mean_square_grad = torch.nn.grad.conv2d_weight(x, conv.weight.shape, y * (2.0 / count), conv.stride,
                                                   conv.padding, conv.dilation, conv.groups)
    return mean_patches, mean_square_grad


def _dot_with_patches(weight: torch.Tensor, mean_patches: torch.Tensor) -> torch.Tensor:
    """⟨W_c, mean patch of c's group⟩ for every output channel c."""
    groups = mean_patches.shape[0]
    return torch.bmm(weight.reshape(groups, weight.shape[0] // groups, -1), mean_patches.unsqueeze(2)).flatten()


def _dot_per_channel(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """⟨W_c, grad_c⟩ for every output channel c, without a weight-sized temporary."""
    channels = weight.shape[0]
    return torch.bmm(grad.reshape(channels, 1, -1), weight.reshape(channels, -1, 1)).flatten()


@dataclass(frozen=True)
class _TaylorTerms:
    """Closed-form gradients of μ and ν at a past iteration, and their products with that iteration's weight."""

    mean_patches: torch.Tensor
    mean_square_grad: torch.Tensor
    mean_patches_dot_weight: torch.Tensor
    mean_square_grad_dot_weight: torch.Tensor


@dataclass(frozen=True)
class _PastIteration:
    mean: torch.Tensor
    mean_square: torch.Tensor
    taylor: _TaylorTerms | None  # not computed for the naive average (rho = 0)


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
        self._windows: list[deque[_PastIteration]] = []
        self._conv_call: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output) of the conv's last call

    def training_state(self) -> dict[str, Any]:
        """Iteration count and the stored past iterations, which a resumed run continues from."""
        windows = [[{"mean": past.mean, "mean_square": past.mean_square,
                     "taylor": None if past.taylor is None else dict(vars(past.taylor))} for past in window]
                   for window in self._windows]
        return {"iterations_done": self.iterations_done, "windows": windows}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.iterations_done = state["iterations_done"]
        self._micro_batch = 0
        device = self.conv.weight.device
        self._windows = [
            deque((_PastIteration(past["mean"].to(device), past["mean_square"].to(device),
                                  None if past["taylor"] is None else
                                  _TaylorTerms(**{k: v.to(device) for k, v in past["taylor"].items()}))
                   for past in window), maxlen=self.window - 1)
            for window in state["windows"]
        ]

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
        entries = self._windows[micro_batch] if micro_batch < len(self._windows) else ()
        dtype = entries[0].mean.dtype if entries else torch.promote_types(self.conv.weight.dtype, torch.float32)
        if not entries:
            empty = self.conv.weight.new_zeros(0, self.num_features, dtype=dtype)
            return empty, empty
        means = torch.stack([e.mean for e in entries])
        mean_squares = torch.stack([e.mean_square for e in entries])
        if self.rho:
            weight = self.conv.weight.detach().to(dtype)
            terms = [e.taylor for e in entries]
            means = means + self.rho * torch.stack(
                [_dot_with_patches(weight, t.mean_patches) - t.mean_patches_dot_weight for t in terms])
            mean_squares = mean_squares + self.rho * torch.stack(
                [_dot_per_channel(weight, t.mean_square_grad) - t.mean_square_grad_dot_weight for t in terms])
        return means, mean_squares

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(y)
        if self.training and self.uses_window():
            return self._cross_iteration_forward(y)
        if self.eps_inside_sqrt:
            return super().forward(y)
        if self.training or self.running_mean is None:
            mean, var = channel_mean_var(y)
            self._update_running_statistics(mean, var, y)
        else:
            mean, var = self.running_mean, self.running_var
        return self._normalize(y, mean, var)

    def ghost_forward(self, y: torch.Tensor, micro_batch: int) -> torch.Tensor:
        """Training forward over ``G`` consecutive micro-batches in one pass (``repro.norms.ghost``): group g is
        micro-batch position g of this iteration, pools with its own window and is stored there, exactly as G
        separate forwards would do. Outside the cross-iteration path, the layer's own forward per group."""
        if not self.uses_window():
            return torch.cat([self.forward(chunk) for chunk in y.split(micro_batch)])
        self._check_input_dim(y)
        conv_call, self._conv_call = self._conv_call, None
        if conv_call is None or conv_call[1] is not y:
            raise RuntimeError(f"CrossIterationBatchNorm2d must be applied to the output of its {self.conv} directly, "
                               "once per call of the conv")
        groups = y.shape[0] // micro_batch
        positions = [self._start_micro_batch() for _ in range(groups)]
        lengths = {len(self._windows[p]) for p in positions}
        if len(lengths) > 1:  # windows filled unevenly (micro-batch count changed): pool group by group
            raise RuntimeError("CBN windows of different lengths within one iteration; use the sequential path")
        grouped = y.unflatten(0, (groups, micro_batch))
        dtype = torch.promote_types(y.dtype, torch.float32)
        mean_now = grouped.to(dtype).mean((1, 3, 4))
        var_now = (grouped.to(dtype) - mean_now[:, None, :, None, None]).square().mean((1, 3, 4))
        with torch.no_grad():
            past = [self.compensated_past_statistics(p) for p in positions]
            past_means = torch.stack([m for m, _ in past])  # (G, stored iterations, C)
            past_vars = torch.stack([q for _, q in past]) - past_means**2
            kept = past_vars >= 0
            count = 1 + kept.sum(1)
            mean_of_past = torch.where(kept, past_means, 0.0).sum(1)
        mean = (mean_now + mean_of_past) / count
        var = (var_now + (mean_now - mean) ** 2
               + torch.where(kept, past_vars + (past_means - mean[:, None]) ** 2, 0.0).sum(1)) / count
        values_per_channel = micro_batch * y.shape[2] * y.shape[3]
        if values_per_channel <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {micro_batch} images "
                             f"of {tuple(y.shape[1:])}")
        if self.running_mean is not None:
            running_statistics_in_order(self, mean_now.detach(),
                                        var_now.detach() * (values_per_channel / (values_per_channel - 1)))
        self._store_groups(positions, conv_call[0], y, mean_now.detach(), var_now.detach())
        return self._normalize(y, mean, var, groups)

    def _remember_conv_call(self, conv: nn.Conv2d, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.training and self.uses_window():
            self._conv_call = (args[0], output)

    def _cross_iteration_forward(self, y: torch.Tensor) -> torch.Tensor:
        conv_call, self._conv_call = self._conv_call, None
        if conv_call is None or conv_call[1] is not y:
            raise RuntimeError(f"CrossIterationBatchNorm2d must be applied to the output of its {self.conv} directly, "
                               "once per call of the conv")
        x = conv_call[0]
        micro_batch = self._start_micro_batch()
        mean_now, var_now = channel_mean_var(y)
        with torch.no_grad():
            past_means, past_mean_squares = self.compensated_past_statistics(micro_batch)
            past_vars = past_mean_squares - past_means**2
            kept = past_vars >= 0
            count = 1 + kept.sum(0)
            mean_of_past = torch.where(kept, past_means, 0.0).sum(0)
        mean = (mean_now + mean_of_past) / count
        # mean of the kept ν minus μ̄², written as a sum of non-negative terms
        var = (var_now + (mean_now - mean) ** 2
               + torch.where(kept, past_vars + (past_means - mean) ** 2, 0.0).sum(0)) / count
        self._update_running_statistics(mean_now, var_now, y)
        self._store(micro_batch, x, y, mean_now.detach(), var_now.detach())
        return self._normalize(y, mean, var)

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
        while len(self._windows) <= micro_batch:
            self._windows.append(deque(maxlen=self.window - 1))
        return micro_batch

    @torch.no_grad()
    def _store(self, micro_batch: int, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        taylor = None
        if self.rho:
            dtype = torch.promote_types(y.dtype, torch.float32)
            mean_patches, mean_square_grad = statistics_gradients(self.conv, x.to(dtype), y.to(dtype))
            weight = self.conv.weight.detach().to(dtype)
            taylor = _TaylorTerms(mean_patches, mean_square_grad, _dot_with_patches(weight, mean_patches),
                                  _dot_per_channel(weight, mean_square_grad))
        self._windows[micro_batch].append(_PastIteration(mean, var + mean**2, taylor))

    @torch.no_grad()
    def _store_groups(self, positions: list[int], x: torch.Tensor, y: torch.Tensor, means: torch.Tensor,
                      variances: torch.Tensor) -> None:
        """``_store`` for every group of a one-pass forward, with one weight-gradient convolution for all groups."""
        groups = len(positions)
        taylor: list[_TaylorTerms | None] = [None] * groups
        if self.rho:
            dtype = torch.promote_types(y.dtype, torch.float32)
            conv = self.conv
            x_groups = x.to(dtype).unflatten(0, (groups, -1))
            y_groups = y.to(dtype).unflatten(0, (groups, -1))
            count = y_groups.shape[1] * y.shape[2] * y.shape[3]
            patches = F.unfold(x_groups.sum(1), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            mean_patches = patches.sum(-1).view(groups, conv.groups, -1) / count
            # the groups side by side as channels: one grouped weight-gradient convolution computes every group's
            side_by_side = [t.transpose(0, 1).flatten(1, 2) for t in (x_groups, y_groups * (2.0 / count))]
            mean_square_grads = torch.nn.grad.conv2d_weight(
                side_by_side[0], (groups * conv.out_channels, *conv.weight.shape[1:]), side_by_side[1], conv.stride,
                conv.padding, conv.dilation, groups * conv.groups).unflatten(0, (groups, -1))
            weight = conv.weight.detach().to(dtype)
            for g in range(groups):
                taylor[g] = _TaylorTerms(mean_patches[g], mean_square_grads[g],
                                         _dot_with_patches(weight, mean_patches[g]),
                                         _dot_per_channel(weight, mean_square_grads[g]))
        for g, position in enumerate(positions):
            self._windows[position].append(_PastIteration(means[g], variances[g] + means[g] ** 2, taylor[g]))

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

    def _normalize(self, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """``y`` normalized with per-channel statistics, ``(C,)``, or per group of ``y``'s images, ``(groups, C)``."""
        if self.eps_inside_sqrt:
            inv_std = torch.rsqrt(var + self.eps)
        else:  # clamp so that a zero-variance channel gets a zero, not a NaN, gradient through the sqrt
            inv_std = 1.0 / (var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() + self.eps)
        scale = inv_std * self.weight if self.affine else inv_std
        shift = self.bias - mean * scale if self.affine else -mean * scale
        grouped = y.unflatten(0, (groups, -1))
        out = grouped * scale.view(groups, 1, -1, 1, 1) + shift.view(groups, 1, -1, 1, 1)
        return out.flatten(0, 1).to(y.dtype)

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
                module.burnin_iterations = round(self.burnin_epochs * steps_per_epoch)

    def after_step(self, model: nn.Module) -> None:
        for module in _cbn_modules(model):
            module.end_iteration()


@register_normalizer("cbn_naive")
class NaiveCrossIterationBatchNorm(CrossIterationBatchNorm):
    """The paper's "naive CBN" baseline: past statistics averaged without compensation (ρ = 0)."""

    def __init__(self, window: int = 4, burnin_iterations: int = 0, burnin_epochs: float | None = None,
                 eps_inside_sqrt: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__(window, 0.0, burnin_iterations, burnin_epochs, eps_inside_sqrt, momentum, eps)


def _cbn_modules(model: nn.Module) -> list[CrossIterationBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
