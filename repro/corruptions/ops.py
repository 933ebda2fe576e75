"""Batched torch versions of the image operations the reference corruptions use (scipy, skimage, OpenCV, PIL).

Images are float ``(N, C, H, W)`` tensors in [0, 1] unless a function says otherwise. Border modes are named
after what they do: ``replicate`` (scipy/skimage ``nearest``), ``reflect101`` (OpenCV's default border,
torch ``reflect``) and ``symmetric`` (scipy ``reflect``: the edge pixel is repeated).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

BorderMode = Literal["replicate", "reflect101", "symmetric"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as in OpenCV RGB2GRAY and PIL "L"


def border_index(size: int, before: int, after: int, mode: BorderMode, device: torch.device) -> Tensor:
    """Source index of each position of an axis padded by ``before``/``after``; works for any pad width."""
    position = torch.arange(-before, size + after, device=device)
    if mode == "replicate" or size == 1:
        return position.clamp(0, size - 1)
    if mode == "reflect101":
        period = 2 * size - 2
        folded = position.remainder(period)
        return torch.where(folded < size, folded, period - folded)
    folded = position.remainder(2 * size)
    return torch.where(folded < size, folded, 2 * size - 1 - folded)


_TORCH_PAD_MODES = {"replicate": "replicate", "reflect101": "reflect"}


def pad2d(x: Tensor, pad_h: int, pad_w: int, mode: BorderMode) -> Tensor:
    """Pad the last two dims; by index gathering where ``F.pad`` cannot (symmetric border, pads wider than the
    image), with ``F.pad`` (several times faster) where it can."""
    if mode in _TORCH_PAD_MODES and pad_h < x.shape[-2] and pad_w < x.shape[-1]:
        return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=_TORCH_PAD_MODES[mode])
    rows = border_index(x.shape[-2], pad_h, pad_h, mode, x.device)
    cols = border_index(x.shape[-1], pad_w, pad_w, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def filter2d(x: Tensor, kernel: Tensor, mode: BorderMode = "reflect101") -> Tensor:
    """Correlate every channel with one odd-sized 2-D kernel (OpenCV ``filter2D`` semantics).

    Laid out as a depthwise convolution (one group per image channel): on the CPU that is about 15x faster than
    a batch of one-channel planes, and each channel's arithmetic does not depend on the batch. Runs in float64
    on CUDA, where cuDNN would otherwise round float32 convolutions to TF32 (10-bit mantissa).
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    dtype = torch.float64 if x.is_cuda else x.dtype
    padded = pad2d(x.reshape(1, n * c, h, w).to(dtype), kh // 2, kw // 2, mode)
    weight = kernel.to(x.device, dtype)[None, None].expand(n * c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w).to(x.dtype)


def _correlate_along(x: Tensor, kernel: Tensor, dim: int, mode: BorderMode) -> Tensor:
    """1-D correlation along ``dim`` as a loop over the taps: elementwise, so it cannot depend on the batch and
    is never TF32 on CUDA, and on the CPU faster than a convolution with a long one-dimensional kernel."""
    size, radius = x.shape[dim], len(kernel) // 2
    if mode in _TORCH_PAD_MODES and radius < size and x.ndim == 4 and dim in (-1, -2, 2, 3):
        along_width = dim in (-1, 3)
        padded = F.pad(x, (radius, radius, 0, 0) if along_width else (0, 0, radius, radius), _TORCH_PAD_MODES[mode])
    else:
        padded = x.index_select(dim, border_index(size, radius, radius, mode, x.device))
    weights = kernel.tolist()
    result = padded.narrow(dim, 0, size) * weights[0]
    for tap in range(1, len(weights)):
        result.add_(padded.narrow(dim, tap, size), alpha=weights[tap])
    return result


def separable_filter(x: Tensor, kernel_h: Tensor, kernel_w: Tensor, mode: BorderMode) -> Tensor:
    """Correlate every channel with ``kernel_h`` along rows then ``kernel_w`` along columns."""
    return _correlate_along(_correlate_along(x, kernel_h, -2, mode), kernel_w, -1, mode)


def gaussian_kernel1d(sigma: float, truncate: float) -> Tensor:
    """scipy's sampled Gaussian: radius ``int(truncate * sigma + 0.5)``, weights normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return torch.ones(1, dtype=torch.float64)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def gaussian_blur(
    x: Tensor, sigma: float | tuple[float, float], truncate: float = 4.0, mode: BorderMode = "replicate"
) -> Tensor:
    """skimage ``gaussian`` per channel (``channel_axis``); defaults match skimage's (nearest border, truncate 4)."""
    sigma_h, sigma_w = (sigma, sigma) if isinstance(sigma, int | float) else sigma
    return separable_filter(x, gaussian_kernel1d(sigma_h, truncate), gaussian_kernel1d(sigma_w, truncate), mode)


def box_blur3(x: Tensor) -> Tensor:
    """OpenCV ``blur(src, (3, 3))``: 3x3 mean, reflect101 border; sums first so integer means stay exact."""
    ones = torch.ones(3, dtype=torch.float64)
    return separable_filter(x, ones, ones, "reflect101") / 9.0


def quantize_uint8(x: Tensor) -> Tensor:
    """``np.uint8(x * 255) / 255``: truncation like the reference, with a guard against float32 round-off."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0 + 1e-3) / 255.0


def luminance(x: Tensor) -> Tensor:
    """``(N, 3, H, W)`` RGB -> ``(N, 1, H, W)`` BT.601 luma."""
    r, g, b = x.unbind(1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b)[:, None]


def motion_blur(x: Tensor, radius: int, sigma: float, angles_deg: Tensor) -> Tensor:
    """imagecorruptions' numpy motion blur: a one-sided Gaussian-weighted sum of shifted copies, per-image angle.

    Tap ``i`` (``0 <= i <= 2 * radius``) shifts the image by ``(-ceil(i sin a - 0.5), -ceil(i cos a - 0.5))``
    with the edge row/column repeated; taps whose shift leaves the image are dropped without renormalising.
    Loops over the taps (at most 41).
    """
    taps = motion_taps(x.shape[-2:], radius, sigma, angles_deg.to(x.device), x.dtype)
    by_slices = not x.is_cuda and x.shape[-2] * x.shape[-1] >= _MIN_PIXELS_FOR_SLICES
    return (_shifted_sum_by_slices if by_slices else _shifted_sum_by_gathers)(x, *taps)


# Below this many pixels per image, one window per image and tap costs more in per-call overhead than it saves
# (measured: at 28x28 in batches of 256 the gathers are 4x faster, at 224x224 the windows 3.5x).
_MIN_PIXELS_FOR_SLICES = 64 * 64


def motion_taps(
    size: tuple[int, int], radius: int, sigma: float, angles_deg: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The motion blur's taps: ``weights`` ``(T,)``, per-image shifts ``shift_y``, ``shift_x`` ``(N, T)`` and
    ``inside`` ``(N, T)``, 1 up to the first tap whose shift leaves the image."""
    width = 2 * radius + 1
    taps = torch.arange(width, dtype=torch.float64, device=angles_deg.device)
    weights = torch.exp(-(taps**2) / (2.0 * sigma**2))
    weights = (weights / weights.sum()).to(dtype)
    angles = torch.deg2rad(angles_deg.to(torch.float64))[:, None]
    # Same float64 expression as the reference: at angles like -30 degrees the offsets sit exactly on .5.
    end_y, end_x = width * torch.sin(angles), width * torch.cos(angles)
    length = torch.hypot(end_y, end_x)
    shift_y = -torch.ceil(taps * end_y / length - 0.5).to(torch.int64)
    shift_x = -torch.ceil(taps * end_x / length - 0.5).to(torch.int64)
    inside = ((shift_y.abs() < size[0]) & (shift_x.abs() < size[1])).to(torch.int32).cummin(dim=1).values
    return weights, shift_y, shift_x, inside


def _shifted_sum_by_gathers(x: Tensor, weights: Tensor, shift_y: Tensor, shift_x: Tensor, inside: Tensor) -> Tensor:
    """``sum_i inside[:, i] * weights[i] * x`` shifted by ``(shift_y[:, i], shift_x[:, i])`` with replicated
    edges, one batched gather per tap: no host sync (the CUDA path)."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    flat = x.reshape(n, c, h * w)
    blurred = torch.zeros_like(flat)
    for tap in range(len(weights)):
        source_rows = (rows[None, :] - shift_y[:, tap, None]).clamp(0, h - 1)
        source_cols = (cols[None, :] - shift_x[:, tap, None]).clamp(0, w - 1)
        source = (source_rows[:, :, None] * w + source_cols[:, None, :]).reshape(n, 1, h * w)
        tap_weight = (weights[tap] * inside[:, tap]).to(x.dtype)[:, None, None]
        blurred += tap_weight * flat.gather(2, source.expand(n, c, h * w))
    return blurred.reshape(n, c, h, w)


def _shifted_sum_by_slices(x: Tensor, weights: Tensor, shift_y: Tensor, shift_x: Tensor, inside: Tensor) -> Tensor:
    """``_shifted_sum_by_gathers`` (same operations, same bits) as windows into one edge-padded copy per image:
    contiguous rows instead of gathers, about three times faster on the CPU, where reading the shifts back
    costs nothing."""
    h, w = x.shape[-2:]
    pad = int(torch.maximum(shift_y.abs(), shift_x.abs()).mul(inside).max())
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate") if pad else x
    blurred = torch.zeros_like(x)
    per_image = zip(inside.sum(1).tolist(), shift_y.tolist(), shift_x.tolist(), strict=True)
    for image, (tap_count, rows, cols) in enumerate(per_image):
        for tap in range(tap_count):
            top, left = pad - rows[tap], pad - cols[tap]
            blurred[image] += weights[tap] * padded[image, :, top : top + h, left : left + w]
    return blurred


def zoom_center(x: Tensor, factor: float) -> Tensor:
    """imagecorruptions' ``clipped_zoom`` before trimming: crop ``ceil(size / factor)`` around the centre and
    resize it by ``factor`` with scipy ``zoom(order=1)`` semantics (output ``round(crop * factor)``, corners
    aligned). The result is at least as large as ``x``; callers trim to ``[:H, :W]``.
    """
    h, w = x.shape[-2:]
    crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = x[..., top : top + crop_h, left : left + crop_w]
    size = (round(crop_h * factor), round(crop_w * factor))
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """skimage ``rgb2hsv`` on ``(N, 3, H, W)``: hue in [0, 1); grey pixels get hue 0 and saturation 0."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    delta = value - x.amin(1)
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    saturation = delta / torch.where(grey, torch.ones_like(value), value)  # grey: 0 / 1
    hue = torch.where(
        b == value,
        4.0 + (r - g) / safe_delta,
        torch.where(g == value, 2.0 + (b - r) / safe_delta, (g - b) / safe_delta),
    )
    hue = torch.where(grey, torch.zeros_like(hue), torch.remainder(hue / 6.0, 1.0))
    return torch.stack([hue, saturation, value], 1)


# For each hue sector, which of (v, t, p, q) feeds R, G and B (skimage hsv2rgb's table).
_HSV_SECTOR_SOURCES = ((0, 1, 2), (3, 0, 2), (2, 0, 1), (2, 3, 0), (1, 2, 0), (0, 2, 3))


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """skimage ``hsv2rgb`` on ``(N, 3, H, W)``."""
    hue, saturation, value = hsv.unbind(1)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - fraction * saturation)
    t = value * (1.0 - (1.0 - fraction) * saturation)
    candidates = torch.stack([value, t, p, q], 1)
    table = torch.tensor(_HSV_SECTOR_SOURCES, device=hsv.device)
    sources = table[sector.to(torch.int64).remainder(6)].permute(0, 3, 1, 2)
    return candidates.gather(1, sources)
