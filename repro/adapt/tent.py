"""``tent``: test entropy minimization (Wang et al., ICLR 2021, arXiv 2006.10726; code DequanWang/tent).

Where the paper text and the official code differ or are silent, this follows:

- statistics: BN layers always normalize with the current batch's mean and biased variance (paper and code;
  the code sets ``running_mean = running_var = None``). Here the source running statistics are kept but
  neither used nor updated.
- parameters: only the affine γ, β of the adapted BN layers (the code collects ``BatchNorm2d`` only; the
  paper says "each normalization layer"). ``adapt_1d`` adds ``BatchNorm1d`` layers; GroupNorm/LayerNorm
  parameters are never adapted.
- loss and step: mean softmax entropy over the batch, one optimizer step per batch; the returned logits come
  from the forward pass used for the loss, i.e. from *before* that step (paper and code), so an update first
  affects the next batch. The paper's offline variant (adapt over the whole set, then re-predict) is not here.
- rest of the network: kept in eval mode. The code calls ``model.train()``, which differs only for models
  with dropout or drop-path (not the ResNets either reference uses).
- optimizer: SGD with momentum 0.9 and lr 0.00025 (paper, ImageNet) by default, Nesterov on as in the
  code's config (the paper does not say); Adam with lr 1e-3, β = (0.9, 0.999) is the paper's setting for the
  other datasets. Weight decay 0, dampening 0 as in the code.
- reset: restores the BN affine parameters and drops the optimizer state (momentum / Adam moments), as the
  code does by reloading copies of both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from repro.adapt.affine import softmax_entropy
from repro.adapt.base import AdaptationMethod, register_method
from repro.adapt.batchnorm import AdaptedBatchNorm, adapt_batchnorms
from repro.errors import UserError

OPTIMIZERS = ("sgd", "adam")


@register_method("tent")
class Tent(AdaptationMethod):
    """Minimize the prediction entropy on each test batch by updating only the BN affine parameters.

    On a model without adaptable BN layers (GroupNorm, Fixup, no normalization) there is nothing to update:
    tent predicts as ``source`` and ``adapts`` is False. When the adapted BNs have no affine parameters
    (MimicNorm's last BN with ``adapt_1d=True``) it normalizes with batch statistics and takes no step.

    Args:
        optimizer: ``"sgd"`` (uses ``momentum`` and ``nesterov``) or ``"adam"`` (uses ``betas``).
        lr: learning rate.
        episodic: reset before every batch (the code's ``episodic=True``). Otherwise the caller decides: reset
            per corruption × severity (the official example) or never (online).
        adapt_1d: also adapt ``BatchNorm1d`` layers; off by default as in the official code.
    """

    stateful = True
    parallel_episodes = True

    def __init__(self, model: nn.Module, *, optimizer: Literal["sgd", "adam"] = "sgd", lr: float = 0.00025,
                 momentum: float = 0.9, nesterov: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, episodic: bool = False, adapt_1d: bool = False) -> None:
        if optimizer not in OPTIMIZERS:
            raise UserError(f"tent: unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if not lr > 0:
            raise UserError(f"tent: lr must be > 0, got {lr}")
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.betas = betas
        self.weight_decay = weight_decay
        self.episodic = episodic
        self.adapt_1d = adapt_1d
        self.episode_count = 1  # episodes side by side in each batch (``episodes``)
        super().__init__(model)
        self.adapted_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer()

    def _convert(self, model: nn.Module) -> list[str]:
        names = adapt_batchnorms(model, pseudo_samples=0.0, unbiased=False, adapt_1d=self.adapt_1d)
        for module in model.modules():
            if isinstance(module, AdaptedBatchNorm) and module.layer.affine:
                module.layer.weight.requires_grad_(True)
                module.layer.bias.requires_grad_(True)
        return names

    def _make_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.adapted_parameters:
            return None
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.adapted_parameters, lr=self.lr, betas=self.betas,
                                    weight_decay=self.weight_decay)
        return torch.optim.SGD(self.adapted_parameters, lr=self.lr, momentum=self.momentum,
                               nesterov=self.nesterov and self.momentum > 0, weight_decay=self.weight_decay)

    def reset(self) -> None:
        super().reset()
        self.optimizer = self._make_optimizer()

    @contextmanager
    def episodes(self, count: int) -> Iterator[None]:
        """Inside, ``predict`` takes the current batches of ``count`` episodes at once, ``count`` equal parts in
        order. Each episode starts from the reset state and has its own γ, β (one row of an E × C parameter per
        layer) and optimizer state; the loss is the sum of the episodes' mean entropies, so each episode's
        gradient and update (SGD and Adam act elementwise) are those of the episode run alone after a reset:
        one forward and backward instead of ``count``, which is what small test batches need (per-call overhead).
        """
        if self.episodic:
            raise TypeError("tent: an episodic tent resets before every batch; its episodes cannot run side by side")
        super().reset()  # the episodes' γ, β start from the reset state's
        layers = [m for m in self.model.modules() if isinstance(m, AdaptedBatchNorm)]
        own = self.adapted_parameters
        episode_parameters = []
        for layer in layers:
            layer.episodes = count
            if layer.layer.affine:
                layer.episode_weight = layer.layer.weight.detach().expand(count, -1).clone().requires_grad_(True)
                layer.episode_bias = layer.layer.bias.detach().expand(count, -1).clone().requires_grad_(True)
                episode_parameters += [layer.episode_weight, layer.episode_bias]
        self.adapted_parameters, self.episode_count = episode_parameters, count
        self.optimizer = self._make_optimizer()
        try:
            yield
        finally:
            for layer in layers:
                layer.episodes = layer.episode_weight = layer.episode_bias = None
            self.adapted_parameters, self.episode_count = own, 1
            self.reset()

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits from the current parameters; then one entropy-minimization step on this batch."""
        if self.episodic:
            self.reset()
        if self.optimizer is None:
            return super().predict(batch)
        with torch.enable_grad():
            logits = self._forward(batch, backward=True)
            softmax_entropy(logits).unflatten(0, (self.episode_count, -1)).mean(1).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()
