"""The CBN layer (``CrossIterationBatchNorm2d``) and the normalizers that put it in place of every BatchNorm:
``cbn`` (compensated, Yao et al. 2021) and ``cbn_naive`` (the paper's uncompensated baseline)."""

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
from repro.norms.cbn.pooled import _PooledBatchNorm
from repro.norms.cbn.taylor import statistics_gradients
from repro.norms.cbn.window import _Windows


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
