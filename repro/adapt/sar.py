"""``sar``: sharpness-aware and reliable entropy minimization (Niu et al., ICLR 2023, arXiv 2302.12400;
code mr-eggplant/SAR).

One update per test batch, as the paper (Eq. 2-5) and the official code do it:

1. forward; entropies E(x); keep the reliable images, E(x) < E₀ (E₀ = 0.4·ln C);
2. SAM's ascent: ε = ρ·g/‖g‖ with g the gradient of their mean entropy (one norm over all learned
   parameters, ‖g‖ + 1e-12), θ ← θ + ε;
3. forward again at θ + ε; among the images reliable in 1, keep those still below E₀; their mean entropy
   is the loss whose gradient, taken at θ + ε, the base optimizer (SGD, momentum 0.9) applies at θ;
4. model recovery: an exponential moving average of that loss (weight 0.9 on the old value) below e_m = 0.2
   resets the model to its initial state (a collapse has made every prediction confident).

The returned logits are those of step 1 (before the update), as in the code. Options and defaults: the
official ``main.py``. lr = None is its rule for ResNets, by test batch size n: 0.00025·2n/64 below n = 32,
0.00025 from 32, doubled again at n = 1 (the code's ``bs1`` experiment); a ViT-B needs lr = 0.001·n/64.
``main.py`` sets lr once per corruption from the configured batch size, so here n is the size of the first
batch after ``reset()`` (a view's first batch: the configured size unless the view is smaller) and a short
last batch, or one after a recovery, keeps that lr. Where no image is reliable the code still takes the SGD
step (zero gradient, so momentum alone moves the parameters); so does this one, and the moving average then
skips that batch.

What a recovery keeps is, by default, what the official code keeps (this project reproduces the papers' code
and documents where it departs). ``SAR.forward`` calls ``reset()``, which sets the average to None, and then
stores back the average that fell below e_m, so the model is reset again after every later batch until the
average climbs back above e_m. The SGD momentum survives a recovery and the ``episodic`` reset:
``SAM.load_state_dict`` restores SAM's own state and parameter groups, not the momentum buffers of the SGD
optimizer it wraps. ``recovery="clean"`` clears the average and the momentum at each of these resets (what this
method did before the option; the lr stays the stream's either way). ``reset()`` itself, between views, clears
everything, as ``main.py`` builds a new model and optimizer for every corruption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from repro.adapt.affine import NORM_LAYERS, NormLayers, prepare_norm_affine, softmax_entropy
from repro.adapt.base import AdaptationMethod, register_method
from repro.errors import UserError

#: Layers SAR keeps as trained (official ``collect_params``): the last stage of a ResNet, the last three blocks
#: and the final norm of a ViT-B.
TOP_LAYERS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm")

Recovery = Literal["official", "clean"]
RECOVERIES = ("official", "clean")


def official_lr(batch_size: int) -> float:
    """SAR's ResNet learning rate for a test batch size (main.py)."""
    lr = 0.00025 * 2 * batch_size / 64 if batch_size < 32 else 0.00025
    return 2 * lr if batch_size == 1 else lr


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a zero gradient) where nothing is selected."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


@register_method("sar")
class SAR(AdaptationMethod):
    """Sharpness-aware entropy minimization of the norm layers' γ, β on reliable images, with model recovery.

    BNs normalize with the test batch's statistics; GroupNorm and LayerNorm γ, β are learned too (``norm_layers
    = "all"``, SAR's ResNet-50-GN and ViT-B). On a model with nothing to learn (no norm layer with affine
    parameters outside ``skip``) it predicts as ``source`` (``adapts`` False), but a BN model whose BNs all sit
    in skipped layers still normalizes with batch statistics, as the code does.

    Args:
        lr: SGD learning rate; None: the official rule for ResNets by test batch size (module docstring).
        momentum: SGD momentum (0.9).
        rho: SAM's neighbourhood radius ρ (0.05).
        margin: E₀ as a fraction of ln C, C = classes (0.4).
        reset_below: e_m, the moving-average entropy below which the model is reset (0.2).
        recovery: what a recovery and the ``episodic`` reset clear besides the parameters: ``"official"``
            nothing (the moving average and the momentum survive, as in the code), ``"clean"`` both.
        skip: layer names (and everything below them) whose parameters stay fixed.
        norm_layers: ``"all"`` (BN, GN, LN; the code) or ``"bn"``.
        episodic: reset before every batch.
        adapt_1d: also adapt ``BatchNorm1d`` layers.
    """

    stateful = True

    def __init__(self, model: nn.Module, *, lr: float | None = None, momentum: float = 0.9, rho: float = 0.05,
                 margin: float = 0.4, reset_below: float = 0.2, recovery: Recovery = "official",
                 skip: Sequence[str] = TOP_LAYERS, norm_layers: NormLayers = "all", episodic: bool = False,
                 adapt_1d: bool = False) -> None:
        if lr is not None and not lr > 0:
            raise UserError(f"sar: lr must be > 0 (or null for the official rule), got {lr}")
        if recovery not in RECOVERIES:
            raise UserError(f"sar: recovery {recovery!r}; allowed: {', '.join(RECOVERIES)}")
        if norm_layers not in NORM_LAYERS:
            raise UserError(f"sar: norm_layers {norm_layers!r}; allowed: {', '.join(NORM_LAYERS)}")
        if not rho >= 0 or not margin > 0:
            raise UserError(f"sar: rho must be >= 0 and margin > 0, got rho={rho}, margin={margin}")
        self.lr, self.momentum, self.rho, self.margin = lr, momentum, rho, margin
        self.reset_below = reset_below
        self.recovery = recovery
        self.skip = tuple(skip)
        self.norm_layers = norm_layers
        self.episodic = episodic
        self.adapt_1d = adapt_1d
        super().__init__(model)
        self.learned = [p for p in self.model.parameters() if p.requires_grad]
        self.reset()

    def _convert(self, model: nn.Module) -> list[str]:
        return prepare_norm_affine(model, norm_layers=self.norm_layers, adapt_1d=self.adapt_1d, skip=self.skip)

    def reset(self) -> None:
        """Initial parameters, no optimizer and no moving average: a fresh start, as for each corruption in
        ``main.py``."""
        super().reset()
        self.optimizer: torch.optim.SGD | None = None  # made at the first batch, whose size sets lr = None
        self.entropy_average: float | None = None

    def _restart(self) -> None:
        """SAR's own reset (recovery, ``episodic``): initial parameters, the same optimizer and lr; only
        ``recovery="clean"`` also drops the momentum and the moving average."""
        super().reset()
        if self.recovery == "clean":
            self.entropy_average = None
            if self.optimizer is not None:
                self.optimizer.state.clear()

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits from the current parameters; then one SAR update on this batch."""
        if self.episodic:
            self._restart()
            self.entropy_average = None  # the code's reset() clears it; only a recovery stores it back
        if not self.learned:
            return super().predict(batch)
        if self.optimizer is None:
            lr = self.lr if self.lr is not None else official_lr(len(batch))
            self.optimizer = torch.optim.SGD(self.learned, lr=lr, momentum=self.momentum)
        with torch.enable_grad():
            logits = self._forward(batch, backward=True)
            margin = self.margin * math.log(logits.shape[1])
            entropy = softmax_entropy(logits)
            reliable = entropy.detach() < margin
            masked_mean(entropy, reliable).backward()
            origin = self._ascend()
            entropy = softmax_entropy(self._forward(batch, backward=True))
            still = reliable & (entropy.detach() < margin)
            loss = masked_mean(entropy, still)
            loss.backward()
        with torch.no_grad():
            for parameter, value in zip(self.learned, origin, strict=True):
                parameter.copy_(value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._recover(loss.item() if still.any() else None)
        return logits.detach()

    @torch.no_grad()
    def _ascend(self) -> list[torch.Tensor]:
        """θ ← θ + ρ·g/(‖g‖ + 1e-12); returns θ before the step and clears the gradients."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.learned]
        scale = self.rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)
        origin = [p.detach().clone() for p in self.learned]
        for parameter, grad in zip(self.learned, grads, strict=True):
            parameter.add_(grad * scale)
            parameter.grad = None
        return origin

    def _recover(self, loss: float | None) -> None:
        if loss is not None:
            average = self.entropy_average
            self.entropy_average = loss if average is None else 0.9 * average + 0.1 * loss
        if self.entropy_average is not None and self.entropy_average < self.reset_below:
            self._restart()
