"""Digital corruptions: contrast, elastic transform, pixelate, JPEG and the held-out saturate."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from repro.corruptions.core import CorruptionContext, register_corruption, register_level_corruption
from repro.corruptions.ops import gaussian_blur, hsv_to_rgb, rgb_to_hsv


@register_corruption("contrast")
def contrast(x: Tensor, context: CorruptionContext) -> Tensor:
    """Pull every channel towards its spatial mean."""
    factor = context.pick(imagenet=(0.4, 0.3, 0.2, 0.1, 0.05), cifar=(0.75, 0.5, 0.4, 0.3, 0.15))
    means = x.mean((2, 3), keepdim=True)
    return (x - means).mul_(factor).add_(means)


def _sample_symmetric(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bilinear samples at float pixel coordinates ``(N, H, W)``, mirrored about the outer pixel edges
    (scipy ``map_coordinates(order=1, mode='reflect')``)."""
    height, width = x.shape[-2:]
    grid = torch.stack([(2.0 * cols + 1.0) / width - 1.0, (2.0 * rows + 1.0) / height - 1.0], -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def _smooth_displacement(
    context: CorruptionContext, purpose: str, shape: tuple[int, int], noise_range: float, sigma: tuple[float, float]
) -> Tensor:
    """Uniform noise in ``(-noise_range, noise_range)``, blurred as skimage ``gaussian(mode="reflect", truncate=3)``."""
    noise = context.random.uniform(purpose, (1, *shape), -noise_range, noise_range)
    return gaussian_blur(noise, sigma, truncate=3.0, mode="symmetric")[:, 0]


def _random_affine_warp(x: Tensor, context: CorruptionContext, jitter: float) -> Tensor:
    """make_cifar_c.py's random affine: move three points around the centre by U(-jitter, jitter) each and warp
    (OpenCV ``warpAffine``: bilinear, reflect101 border)."""
    count, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    centre_x, centre_y, half = float(width // 2), float(height // 2), float(min(height, width) // 3)
    anchors = torch.tensor(
        [[centre_x + half, centre_y + half], [centre_x + half, centre_y - half], [centre_x - half, centre_y - half]],
        dtype=torch.float64,
        device=x.device,
    )
    moved = anchors + context.random.uniform("affine", (3, 2), -jitter, jitter, dtype=torch.float64)
    # Output pixel p reads the input at B p, where the affine map B takes the moved points back to the anchors.
    homogeneous = torch.cat([moved, torch.ones(count, 3, 1, dtype=torch.float64, device=x.device)], 2)
    back = torch.linalg.solve(homogeneous, anchors.expand(count, 3, 2))  # (N, 3, 2): [x y 1] @ back
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=x.device),
        torch.arange(width, dtype=torch.float64, device=x.device),
        indexing="ij",
    )
    pixels = torch.stack([cols, rows, torch.ones_like(rows)], -1).reshape(1, -1, 3)
    source = (pixels @ back).reshape(count, height, width, 2)
    grid = torch.stack([2.0 * source[..., 0] / (width - 1) - 1.0, 2.0 * source[..., 1] / (height - 1) - 1.0], -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)


# make_cifar_c.py: (displacement amplitude, displacement sigma, affine jitter) as fractions of the side.
_CIFAR_ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
# imagecorruptions: displacement amplitude (sigma is 1 % of the side, the noise range 0.5 % of the height).
_IMAGENET_ELASTIC_ALPHA = tuple(250 * v for v in (0.05, 0.065, 0.085, 0.1, 0.12))


@register_corruption("elastic_transform")
def elastic_transform(x: Tensor, context: CorruptionContext) -> Tensor:
    """Resample along a smooth random displacement field.

    From 64 px: imagecorruptions' variant (no affine step). Below 64 px: make_cifar_c.py's (random affine, then
    displacement), lengths in units of the shorter side. Neither is the algorithm (affine + displacement with
    other constants) that made the released ImageNet-C files.
    """
    height, width = x.shape[-2:]
    if context.low_resolution:
        side = min(height, width)
        alpha, sigma, jitter = (side * v for v in _CIFAR_ELASTIC[context.severity - 1])
        x = _random_affine_warp(x, context, jitter)
        noise_range: float = 1.0
        sigmas: tuple[float, float] = (sigma, sigma)
    else:
        alpha = _IMAGENET_ELASTIC_ALPHA[context.severity - 1]
        noise_range, sigmas = 0.005 * height, (0.01 * height, 0.01 * width)
    shift_x = _smooth_displacement(context, "dx", (height, width), noise_range, sigmas) * alpha
    shift_y = _smooth_displacement(context, "dy", (height, width), noise_range, sigmas) * alpha
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=x.dtype, device=x.device),
        torch.arange(width, dtype=x.dtype, device=x.device),
        indexing="ij",
    )
    return _sample_symmetric(x, rows + shift_y, cols + shift_x)


_PIL_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling


@functools.lru_cache(maxsize=32)
def _pil_box_taps(source_size: int, target_size: int) -> tuple[Tensor, Tensor]:
    """Pillow's BOX resampling as taps: ``(target, T)`` source indices and fixed-point integer weights (int32),
    following its coefficient code (pixels whose centre lies in the box, normalised, times 2**22)."""
    scale = source_size / target_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    rows = []
    for out in range(target_size):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), source_size)
        inside = [i for i in range(first, last) if -0.5 < (i - centre + 0.5) / filter_scale <= 0.5]
        rows.append([(i, math.floor(0.5 + 2**_PIL_PRECISION_BITS / len(inside))) for i in inside])
    tap_count = max(len(row) for row in rows)
    padded = [row + [(row[0][0], 0)] * (tap_count - len(row)) for row in rows]
    indices = torch.tensor([[index for index, _ in row] for row in padded])
    weights = torch.tensor([[weight for _, weight in row] for row in padded], dtype=torch.int32)
    return indices, weights


def _pil_box_resize_axis(levels: Tensor, dim: int, target_size: int) -> Tensor:
    """One Pillow resampling pass along ``dim`` on int32 levels, rounded like Pillow. Integer arithmetic is
    exact: the weights sum to about 2**22, so a sum stays below 255 * 2**22 + 2**21 < 2**31."""
    indices, weights = (t.to(levels.device) for t in _pil_box_taps(levels.shape[dim], target_size))
    shape = [1] * levels.ndim
    shape[dim] = target_size
    sums = torch.full((), 2 ** (_PIL_PRECISION_BITS - 1), dtype=torch.int32, device=levels.device)
    for tap in range(indices.shape[1]):
        sums = sums + levels.index_select(dim, indices[:, tap]) * weights[:, tap].reshape(shape)
    return (sums >> _PIL_PRECISION_BITS).clamp_(0, 255)


def _pixelate_batched(levels: Tensor, small_h: int, small_w: int) -> Tensor:
    """Pillow's two resizes restated as batched integer tensor ops (the CUDA path; equal to Pillow's bits)."""
    height, width = levels.shape[-2:]
    small = _pil_box_resize_axis(_pil_box_resize_axis(levels.to(torch.int32), -1, small_w), -2, small_h)
    nearest_rows = torch.floor((torch.arange(height, dtype=torch.float64) + 0.5) * small_h / height).long()
    nearest_cols = torch.floor((torch.arange(width, dtype=torch.float64) + 0.5) * small_w / width).long()
    small = small.to(torch.uint8).index_select(-2, nearest_rows.to(levels.device))
    return small.index_select(-1, nearest_cols.to(levels.device))


def _per_image_with_pillow(levels: Tensor, operation: Callable[[Image.Image], Image.Image]) -> Tensor:
    """``operation`` on each uint8 ``(3, H, W)`` image as a Pillow RGB image (CPU tensors only).

    From 64x64 px Pillow merges and splits the channel planes, which is faster than permuting the batch to
    ``(N, H, W, 3)`` and back; for smaller images the two extra calls per image cost more than the permutes.
    """
    if levels.shape[-2] * levels.shape[-1] < 64 * 64:
        pixels = levels.permute(0, 2, 3, 1).contiguous().numpy()
        results = [np.asarray(operation(Image.fromarray(image))) for image in pixels]
        return torch.from_numpy(np.stack(results)).permute(0, 3, 1, 2)
    planes = levels.contiguous().numpy()
    channel_planes = np.empty_like(planes)
    for image, result in zip(planes, channel_planes, strict=True):
        rgb = Image.merge("RGB", [Image.fromarray(plane) for plane in image])
        for channel, plane in enumerate(operation(rgb).split()):
            result[channel] = np.asarray(plane)
    return torch.from_numpy(channel_planes)


@register_level_corruption("pixelate")
def pixelate(levels: Tensor, context: CorruptionContext) -> Tensor:
    """Pillow ``resize(BOX)`` down to ``factor`` of the size, then ``resize(NEAREST)`` back up.

    On the CPU that is Pillow itself, image by image: its integer code beats any batched restatement (five
    times slower here). On CUDA, ``_pixelate_batched`` computes the same bits without leaving the device.
    """
    factor = context.pick(imagenet=(0.6, 0.5, 0.4, 0.3, 0.25), cifar=(0.95, 0.9, 0.85, 0.75, 0.65))
    height, width = levels.shape[-2:]
    small_h, small_w = int(height * factor), int(width * factor)
    if levels.is_cuda:
        return _pixelate_batched(levels, small_h, small_w)
    return _per_image_with_pillow(
        levels, lambda image: image.resize((small_w, small_h), Image.BOX).resize((width, height), Image.NEAREST)
    )


@register_level_corruption("jpeg_compression")
def jpeg_compression(levels: Tensor, context: CorruptionContext) -> Tensor:
    """Pillow JPEG round trip at a low quality, one image at a time on the CPU (also for CUDA input).

    Not batched: bit-exact agreement needs libjpeg's own integer colour conversion, DCT, quantisation and chroma
    upsampling (nvjpeg rounds differently; torchvision's libjpeg gives the same bits at the same speed, but its
    image I/O is deprecated).
    """
    quality = context.pick(imagenet=(25, 18, 15, 10, 7), cifar=(80, 65, 58, 50, 40))

    def round_trip(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        compressed = Image.open(buffer, formats=["JPEG"])  # decodes as RGB, like its source
        compressed.load()
        return compressed

    return _per_image_with_pillow(levels.cpu(), round_trip).to(levels.device)


@register_corruption("saturate")
def saturate(x: Tensor, context: CorruptionContext) -> Tensor:
    """Scale and shift the HSV saturation (held-out corruption)."""
    gain, offset = context.pick(
        imagenet=((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        cifar=((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    )
    hue, saturation, value = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([hue, (saturation * gain + offset).clamp(0.0, 1.0), value], 1))
