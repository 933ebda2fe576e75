"""``flip_average``: predict each test image from the mean of its logits and its horizontally flipped copy's
(test-time augmentation with one flip). Nothing is learned and no layer changes."""

import torch

from repro.adapt import AdaptationMethod, register_method


@register_method("flip_average")
class FlipAverage(AdaptationMethod):
    forward_only = True
    batch_independent = True  # each image's prediction depends on that image alone

    @property
    def adapts(self) -> bool:
        return True  # it predicts otherwise than the source model, though it changes no layer

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return (self._forward(batch) + self._forward(batch.flip(-1))) / 2

    predict_frozen = predict
