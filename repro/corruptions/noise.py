"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and the held-out speckle noise.

Noise is drawn independently per pixel *and channel*, as in the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repro.corruptions.core import CorruptionContext, register_corruption, register_level_corruption


@register_corruption("gaussian_noise")
def gaussian_noise(x: Tensor, context: CorruptionContext) -> Tensor:
    """Additive N(0, std^2) noise."""
    std = context.pick(imagenet=(0.08, 0.12, 0.18, 0.26, 0.38), cifar=(0.04, 0.06, 0.08, 0.09, 0.10))
    return context.random.normal("noise", tuple(x.shape[1:]), std=std, added_to=x)


@register_corruption("shot_noise")
def shot_noise(x: Tensor, context: CorruptionContext) -> Tensor:
    """Photon noise: ``Poisson(x * photons) / photons``, sampled exactly (one CDF table per uint8 level)."""
    photons = context.pick(imagenet=(60, 25, 12, 5, 3), cifar=(500, 250, 100, 75, 50))
    levels = torch.round(x * 255.0).to(torch.int64)
    rate_per_level = torch.arange(256, dtype=torch.float64) / 255.0 * photons
    counts = context.random.poisson("noise", rate_per_level, levels)
    return counts.to(x.dtype).div_(photons)


@register_level_corruption("impulse_noise")
def impulse_noise(levels: Tensor, context: CorruptionContext) -> Tensor:
    """Salt and pepper (skimage ``random_noise(mode='s&p')``): a fraction ``amount`` of values set to 0 or 255.

    On uint8 levels: the result is a level either way, so the float round trip would only cost time.
    """
    amount = context.pick(imagenet=(0.03, 0.06, 0.09, 0.17, 0.27), cifar=(0.01, 0.02, 0.03, 0.05, 0.07))
    threshold = round(amount * 2**24)

    def salt_and_pepper(words: Tensor, clean: Tensor) -> Tensor:
        flipped = ((words >> 8) & 0xFFFFFF) < threshold  # top 24 bits: P(flip) = amount
        salt = (words & 1).to(torch.uint8).mul_(255)  # lowest bit: salt or pepper with probability 1/2 each
        return torch.where(flipped, salt, clean)

    return context.random.map_words(("impulse",), tuple(levels.shape[1:]), torch.uint8, salt_and_pepper, levels)


@register_corruption("speckle_noise")
def speckle_noise(x: Tensor, context: CorruptionContext) -> Tensor:
    """Multiplicative noise ``x + x * N(0, std^2)`` (held-out corruption)."""
    std = context.pick(imagenet=(0.15, 0.2, 0.35, 0.45, 0.6), cifar=(0.06, 0.1, 0.12, 0.16, 0.2))
    return context.random.normal("noise", tuple(x.shape[1:]), std=std).mul_(x).add_(x)
