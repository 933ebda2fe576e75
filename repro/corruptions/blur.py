"""Blur corruptions: defocus, glass, motion, zoom and the held-out gaussian blur."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from repro.corruptions.core import CorruptionContext, register_corruption, register_level_corruption, truncate_to_levels
from repro.corruptions.ops import filter2d, gaussian_blur, motion_blur, quantize_uint8, separable_filter, zoom_center
from repro.corruptions.random_stream import RandomStream


@functools.lru_cache(maxsize=16)
def _disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The reference's defocus kernel: a normalised disk on a grid of at least +-8 px, anti-aliased by OpenCV
    ``GaussianBlur`` (3x3 up to radius 8, else 5x5, reflect101 border). Returned without its all-zero border
    rows and columns (the grid is wider than small disks), which only makes the convolution cheaper."""
    extent = 8 if radius <= 8 else math.ceil(radius)
    smoothing_size = 3 if radius <= 8 else 5
    offsets = torch.arange(-extent, extent + 1, dtype=torch.float64)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).to(torch.float64)
    disk /= disk.sum()
    taps = torch.arange(smoothing_size, dtype=torch.float64) - (smoothing_size - 1) / 2
    smoothing = torch.exp(-(taps**2) / (2.0 * alias_blur**2))
    smoothing /= smoothing.sum()
    kernel = separable_filter(disk[None, None], smoothing, smoothing, "reflect101")[0, 0]
    border = extent - int(torch.nonzero(kernel).sub(extent).abs().max())
    return kernel[border : kernel.shape[0] - border, border : kernel.shape[1] - border]


@register_level_corruption("defocus_blur")
def defocus_blur(levels: Tensor, context: CorruptionContext) -> Tensor:
    """Convolution with an anti-aliased disk (out-of-focus lens).

    On the 0-255 scale, which saves the two scaling passes of the float path (a third of the time); the float32
    results then differ from those on the [0, 1] scale in the last bit, which moves about 3 in 100,000 values
    across a truncation boundary (one level).
    """
    radius, alias_blur = context.pick(
        imagenet=((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        cifar=((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    )
    return truncate_to_levels(filter2d(levels.to(torch.float32), _disk_kernel(radius, alias_blur)))


def _local_shuffle(x: Tensor, max_delta: int, random: RandomStream, purpose: str) -> Tensor:
    """One pass of the reference's sequential pixel "swap", computed exactly without a per-pixel loop.

    The reference visits rows ``H - d .. d + 1`` and, within a row, columns ``W - d .. d + 1`` (both descending),
    and copies into each visited pixel the current value of a neighbour at offset ``dy, dx`` in ``[-d, d)``.
    (The tuple "swap" on numpy views copies one way only.) A neighbour visited earlier already holds its final
    value, any other one still holds its value from before the pass. So each pixel's final value is the
    before-pass value at the end of a chain of pointers into earlier-visited pixels; pointer jumping resolves
    all chains in O(log length) batched gathers.
    """
    n, c, h, w = x.shape
    visit_rows = torch.arange(h - max_delta, max_delta, -1, device=x.device)
    visit_cols = torch.arange(w - max_delta, max_delta, -1, device=x.device)
    if len(visit_rows) == 0 or len(visit_cols) == 0:
        return x
    grid_shape = (len(visit_rows), len(visit_cols))
    shift_x = random.integers(purpose + "/dx", -max_delta, max_delta, grid_shape)
    shift_y = random.integers(purpose + "/dy", -max_delta, max_delta, grid_shape)

    source_rows = visit_rows[None, :, None] + shift_y
    source_cols = visit_cols[None, None, :] + shift_x
    # Visit order of the source: row-major over the visited grid (both axes descending in the image).
    source_visit_row = (h - max_delta) - source_rows
    source_visit_col = (w - max_delta) - source_cols
    source_visited = (
        (source_visit_row >= 0)
        & (source_visit_row < grid_shape[0])
        & (source_visit_col >= 0)
        & (source_visit_col < grid_shape[1])
    )
    visit_time = torch.arange(grid_shape[0] * grid_shape[1], device=x.device).reshape(grid_shape)
    visited_earlier = source_visited & (source_visit_row * grid_shape[1] + source_visit_col < visit_time)

    # The visited grid is the image rectangle rows/columns d + 1 .. H - d / W - d, flipped in both axes.
    visited = (slice(None), slice(max_delta + 1, h - max_delta + 1), slice(max_delta + 1, w - max_delta + 1))
    # Pointers, with resolved ones (final source p) stored as ~p = -p - 1: following an unresolved pointer p to
    # pointer[p] then yields the next pointer, or the resolved source, in this same encoding.
    pointer = torch.arange(h * w, device=x.device).bitwise_not_().repeat(n, 1)
    source = (source_rows * w + source_cols).flip(1, 2)
    pointer.view(n, h, w)[visited] = torch.where(visited_earlier.flip(1, 2), source, ~source)
    # A chain steps to ever earlier visited pixels, so it is shorter than the visited grid, and pointer jumping
    # resolves chains of length 2**k in k rounds. The CPU stops as soon as all are resolved; CUDA runs the
    # bound, which reads nothing back from the device.
    for _ in range(math.ceil(math.log2(grid_shape[0] * grid_shape[1])) + 1):
        unresolved = pointer >= 0
        if not x.is_cuda and not bool(unresolved.any()):
            break
        pointer = torch.where(unresolved, pointer.gather(1, pointer.clamp(min=0)), pointer)
    target = pointer.bitwise_not_()
    flat = x.reshape(n, c, h * w)
    return flat.gather(2, target[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)


@register_corruption("glass_blur")
def glass_blur(x: Tensor, context: CorruptionContext) -> Tensor:
    """Gaussian blur, local pixel shuffling on the uint8 image (``iterations`` passes), Gaussian blur again.

    The passes are sequential (each reads the previous one); within a pass see ``_local_shuffle``.
    """
    sigma, max_delta, iterations = context.pick(
        imagenet=((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        cifar=((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    )
    shuffled = quantize_uint8(gaussian_blur(x, sigma))
    for iteration in range(iterations):
        shuffled = _local_shuffle(shuffled, max_delta, context.random, f"pass{iteration}")
    return gaussian_blur(shuffled, sigma)


@register_corruption("motion_blur")
def motion_blur_corruption(x: Tensor, context: CorruptionContext) -> Tensor:
    """Blur along a random direction (angle uniform in [-45, 45) degrees per image).

    imagecorruptions' numpy kernel, not ImageMagick's (which made the released ImageNet-C / CIFAR-10-C).
    """
    radius, sigma = context.pick(
        imagenet=((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        cifar=((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    )
    angles = context.random.uniform("angle", low=-45.0, high=45.0, dtype=torch.float64)
    return motion_blur(x, radius, sigma, angles)


@register_corruption("zoom_blur")
def zoom_blur(x: Tensor, context: CorruptionContext) -> Tensor:
    """Average of the image and centre zooms by factors ``1, 1 + step, ... < stop`` (loops over the factors)."""
    stop, step = context.pick(
        imagenet=((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),
        cifar=((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    )
    factors = np.arange(1.0, stop, step).tolist()  # numpy's float steps decide output sizes (round(26 * 1.25))
    height, width = x.shape[-2:]
    total = x.clone()
    for factor in factors:
        total += zoom_center(x, factor)[..., :height, :width]
    return total.div_(len(factors) + 1)


@register_corruption("gaussian_blur")
def gaussian_blur_corruption(x: Tensor, context: CorruptionContext) -> Tensor:
    """skimage Gaussian blur (held-out corruption)."""
    sigma = context.pick(imagenet=(1, 2, 3, 4, 6), cifar=(0.4, 0.6, 0.7, 0.8, 1))
    return gaussian_blur(x, sigma)
