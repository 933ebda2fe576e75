"""``eata``: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022, arXiv 2204.02610; code
mr-eggplant/EATA).

One update per test batch, as the paper (Eq. 3-9) and the official code do it:

1. forward; entropies E(x); reliable images: E(x) < E₀ (E₀ = 0.4·ln C, the code's default);
2. non-redundant images among them: |cos(m, p(x))| < ε, m the moving average of the selected images' mean
   probability vector (m ← 0.9·m + 0.1·mean p over the images selected in this batch; the first batch sets m
   to the mean over its reliable images, and every reliable image is kept then);
3. loss = mean over all images of S(x)·E(x), S(x) = 1/exp(E(x) − E₀) on the selected images and 0 elsewhere
   (the code's masked mean: it divides by the number selected), plus the anti-forgetting term
   β·Σ_i F_i (θ_i − θ⁰_i)²; one SGD step (momentum 0.9) when any image was selected.

F is the diagonal Fisher information at the source parameters θ⁰, estimated by ``calibrate`` on clean images
with the model's own predictions as labels: the squared gradient of each batch's mean cross-entropy, averaged
over batches. Without it (``fisher_alpha`` = 0, or no clean images given) the method is the paper's ETA.
The returned logits are those of step 1 (before the update).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from repro.adapt.affine import NORM_LAYERS, NormLayers, prepare_norm_affine, softmax_entropy
from repro.adapt.base import AdaptationMethod, register_method
from repro.errors import UserError


@register_method("eata")
class EATA(AdaptationMethod):
    """Entropy minimization of BN γ, β on reliable, non-redundant images, with a Fisher anti-forgetting penalty.

    BNs normalize with the test batch's statistics. On a model with nothing to learn (no BN with affine
    parameters, and ``norm_layers="bn"``, the code's choice) it predicts as ``source`` and ``adapts`` is False;
    ``norm_layers="all"`` also learns GroupNorm and LayerNorm γ, β.

    Args:
        lr: SGD learning rate (0.00025, the code's for ImageNet at batch 64), momentum 0.9.
        margin: E₀ as a fraction of ln C, C = classes (0.4).
        redundancy: ε, the cosine-similarity threshold (0.05).
        fisher_alpha: β, the weight of the anti-forgetting term (2000).
        fisher_images: clean images ``calibrate`` uses for the Fisher information (2000).
        episodic: reset before every batch. A reset also forgets the moving average m (the code keeps it).
    """

    stateful = True

    def __init__(self, model: nn.Module, *, lr: float = 0.00025, momentum: float = 0.9, margin: float = 0.4,
                 redundancy: float = 0.05, fisher_alpha: float = 2000.0, fisher_images: int = 2000,
                 norm_layers: NormLayers = "bn", episodic: bool = False, adapt_1d: bool = False) -> None:
        if not lr > 0 or not margin > 0 or not fisher_alpha >= 0 or fisher_images < 1:
            raise UserError(f"eata: need lr > 0, margin > 0, fisher_alpha >= 0, fisher_images >= 1; got lr={lr}, "
                            f"margin={margin}, fisher_alpha={fisher_alpha}, fisher_images={fisher_images}")
        if norm_layers not in NORM_LAYERS:
            raise UserError(f"eata: norm_layers {norm_layers!r}; allowed: {', '.join(NORM_LAYERS)}")
        self.lr, self.momentum, self.margin, self.redundancy = lr, momentum, margin, redundancy
        self.fisher_alpha, self.fisher_images = fisher_alpha, fisher_images
        self.norm_layers = norm_layers
        self.episodic = episodic
        self.adapt_1d = adapt_1d
        super().__init__(model)
        self.learned = [p for p in self.model.parameters() if p.requires_grad]
        self.fisher: list[torch.Tensor] = []  # one per learned parameter; empty: no anti-forgetting term
        self.anchor = [p.detach().clone() for p in self.learned]
        self.reset()

    def _convert(self, model: nn.Module) -> list[str]:
        return prepare_norm_affine(model, norm_layers=self.norm_layers, adapt_1d=self.adapt_1d)

    def reset(self) -> None:
        super().reset()
        self.optimizer = torch.optim.SGD(self.learned, lr=self.lr, momentum=self.momentum) if self.learned else None
        self.average_probs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> EATA:
        self.fisher = [f.to(device) for f in self.fisher]
        self.anchor = [a.to(device) for a in self.anchor]
        return super().to(device)

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Estimate the Fisher information on clean normalized batches (up to ``fisher_images`` images)."""
        if not self.learned or self.fisher_alpha == 0:
            return
        sums, count, seen = [torch.zeros_like(p) for p in self.learned], 0, 0
        for batch in batches:
            if seen >= self.fisher_images:
                break
            batch = batch[: self.fisher_images - seen]
            with torch.enable_grad():
                logits = self.model(batch)
                grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), self.learned,
                                            allow_unused=True)
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total.add_(grad.square())
            count, seen = count + 1, seen + len(batch)
        self.fisher = [total / max(count, 1) for total in sums]

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits from the current parameters; then one EATA update on this batch."""
        if self.episodic:
            self.reset()
        if self.optimizer is None:
            return super().predict(batch)
        with torch.enable_grad():
            logits = self._forward(batch, backward=True)
            margin = self.margin * math.log(logits.shape[1])
            entropy = softmax_entropy(logits)
            probs = logits.detach().softmax(1)
            selected = entropy.detach() < margin
            if self.average_probs is not None:
                similar = F.cosine_similarity(self.average_probs.unsqueeze(0), probs, dim=1).abs() >= self.redundancy
                selected = selected & ~similar
            self._update_average(probs, selected)
            weight = torch.exp(margin - entropy.detach()) * selected
            loss = (entropy * weight).sum() / selected.sum().clamp_min(1)
            if self.fisher:
                loss = loss + self.fisher_alpha * sum((f * (p - a).square()).sum() for f, p, a
                                                      in zip(self.fisher, self.learned, self.anchor, strict=True))
            if selected.any():
                loss.backward()
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    @torch.no_grad()
    def _update_average(self, probs: torch.Tensor, selected: torch.Tensor) -> None:
        if not selected.any():
            return
        mean = probs[selected].mean(0)
        self.average_probs = mean if self.average_probs is None else 0.9 * self.average_probs + 0.1 * mean
