"""Weather corruptions: snow, frost, fog, brightness and the held-out spatter."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from repro.corruptions.core import CorruptionContext, register_corruption
from repro.corruptions.opencv_ops import canny, chamfer_distance_to, equalize_histogram
from repro.corruptions.ops import (
    box_blur3,
    filter2d,
    gaussian_blur,
    hsv_to_rgb,
    luminance,
    motion_blur,
    rgb_to_hsv,
    zoom_center,
)
from repro.corruptions.random_stream import RandomStream
from repro.errors import UserError

FROST_DIR_ENV = "REPRO_FROST_DIR"
# The reference draws one of the first five textures (randint(5)); frost6.jpg ships but is never used.
FROST_TEXTURE_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
CIFAR_FROST_SCALE = 0.2  # make_cifar_c.py shrinks the textures by 5 before cropping 32x32 patches


@register_corruption("snow")
def snow(x: Tensor, context: CorruptionContext) -> Tensor:
    """Zoomed, thresholded Gaussian flakes streaked by motion blur (angle in [-135, -45) degrees), added twice
    (second copy rotated 180 degrees) onto an image brightened towards ``1.5 * gray + 0.5``.

    Uses imagecorruptions' numpy motion blur, not ImageMagick's like the released datasets.
    """
    loc, scale, zoom, threshold, radius, sigma, blend = context.pick(
        imagenet=(
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        cifar=(
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
    )
    height, width = x.shape[-2:]
    flakes = zoom_center(context.random.normal("flakes", (1, height, width), mean=loc, std=scale), zoom)
    flakes = torch.where(flakes < threshold, 0.0, flakes).clamp(0.0, 1.0)
    angles = context.random.uniform("angle", low=-135.0, high=-45.0, dtype=torch.float64)
    flakes = motion_blur(flakes, radius, sigma, angles)
    flakes = (torch.round(flakes * 255.0) / 255.0)[..., :height, :width]
    brightened = torch.maximum(x, luminance(x) * 1.5 + 0.5)
    return (blend * x).add_(brightened.mul_(1.0 - blend)).add_(flakes).add_(flakes.flip(-2, -1))


def frost_texture_dir() -> Path:
    """Where the reference's frost textures are: ``$REPRO_FROST_DIR`` or the installed ``imagecorruptions``."""
    configured = os.environ.get(FROST_DIR_ENV)
    if configured:
        directory: Path | None = Path(configured)
    else:
        spec = importlib.util.find_spec("imagecorruptions")  # locates the package without importing it
        directory = Path(spec.origin).parent / "frost" if spec is not None and spec.origin else None
    if directory is None or not all((directory / name).is_file() for name in FROST_TEXTURE_FILES):
        raise UserError(
            f"the frost corruption needs the reference texture images {', '.join(FROST_TEXTURE_FILES)}: "
            f"`pip install imagecorruptions` (they ship inside that package), or set {FROST_DIR_ENV} to a directory "
            f"holding them (looked in {directory or 'no imagecorruptions install'})"
        )
    return directory


@functools.lru_cache(maxsize=2)
def _load_frost_textures(directory: str) -> tuple[Tensor, ...]:
    """The textures as uint8 ``(3, h, w)`` RGB tensors (alpha dropped, like ``cv2.imread``)."""
    textures = []
    for name in FROST_TEXTURE_FILES:
        with Image.open(Path(directory) / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        textures.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    return tuple(textures)


@functools.lru_cache(maxsize=8)
def _scaled_frost_textures(
    directory: str, height: int, width: int, low_resolution: bool, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Textures resized for ``height x width`` images: their float [0, 1] pixels, texture after texture, as one
    ``(3, total)`` tensor on ``device`` (so that crops of different textures are one gather), with each
    texture's start in it and its height and width (three ``(5,)`` int64 tensors on ``device``).

    ImageNet regime (imagecorruptions): grow the texture to cover the image if needed, then by 1.1 more,
    bicubic. Low resolution (make_cifar_c.py): shrink by 5 with bilinear, or fall back to the ImageNet rule if
    the shrunk texture would not cover the image.
    """
    scaled = []
    for texture in _load_frost_textures(directory):
        texture_h, texture_w = texture.shape[-2:]
        batch = texture[None].to(torch.float32)
        shrunk_h, shrunk_w = math.floor(texture_h * CIFAR_FROST_SCALE), math.floor(texture_w * CIFAR_FROST_SCALE)
        if low_resolution and shrunk_h >= height and shrunk_w >= width:
            resized = F.interpolate(
                batch,
                scale_factor=CIFAR_FROST_SCALE,
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
        else:
            factor = max(1.0, height / texture_h, width / texture_w) * 1.1
            size = (math.ceil(texture_h * factor), math.ceil(texture_w * factor))
            resized = F.interpolate(batch, size=size, mode="bicubic", align_corners=False)
        scaled.append(torch.round(resized[0]).clamp(0, 255) / 255.0)
    sizes = torch.tensor([texture.shape[-2:] for texture in scaled])
    starts = torch.cumsum(sizes.prod(1), 0) - sizes.prod(1)
    pixels = torch.cat([texture.reshape(3, -1) for texture in scaled], 1)
    return pixels.to(device), starts.to(device), sizes[:, 0].to(device), sizes[:, 1].to(device)


@register_corruption("frost")
def frost(x: Tensor, context: CorruptionContext) -> Tensor:
    """Blend with a random crop of one of five frost photographs: ``a * x + b * frost``."""
    image_weight, frost_weight = context.pick(
        imagenet=((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
        cifar=((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    )
    height, width = x.shape[-2:]
    pixels, starts, heights, widths = _scaled_frost_textures(
        str(frost_texture_dir()), height, width, context.low_resolution, x.device
    )
    choice = context.random.integers("texture", 0, len(FROST_TEXTURE_FILES))
    texture_heights, texture_widths = heights[choice], widths[choice]
    top = context.random.integers("top", 0, (texture_heights - height).clamp(min=1))
    left = context.random.integers("left", 0, (texture_widths - width).clamp(min=1))

    rows = top[:, None] + torch.arange(height, device=x.device)
    cols = left[:, None] + torch.arange(width, device=x.device)
    source = starts[choice, None, None] + rows[:, :, None] * texture_widths[:, None, None] + cols[:, None, :]
    crops = pixels[:, source].transpose(0, 1)
    return (image_weight * x).add_(crops.mul_(frost_weight))


def _plasma_fractal(random: RandomStream, map_size: int, wibble_decay: float) -> Tensor:
    """Diamond-square height map in [0, 1], ``(N, map_size, map_size)``, as the reference's ``plasma_fractal``.

    Sequential over the ``log2(map_size)`` scales; each scale fills all squares / diamonds at once.
    """
    maps = torch.zeros(len(random.indices), map_size, map_size, device=random.device)
    step, wibble, level = map_size, 100.0, 0

    def wibbled_mean(neighbour_sum: Tensor, purpose: str) -> Tensor:
        noise = random.uniform(f"{purpose}{level}", tuple(neighbour_sum.shape[1:]), -wibble, wibble)
        return neighbour_sum / 4.0 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square_sum = corners + corners.roll(-1, 1)
        square_sum = square_sum + square_sum.roll(-1, 2)
        maps[:, half::step, half::step] = wibbled_mean(square_sum, "square")

        centres, corners = maps[:, half::step, half::step], maps[:, 0::step, 0::step]
        row_diamond_sum = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        column_diamond_sum = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        maps[:, 0::step, half::step] = wibbled_mean(row_diamond_sum, "row_diamond")
        maps[:, half::step, 0::step] = wibbled_mean(column_diamond_sum, "column_diamond")
        step, wibble, level = half, wibble / wibble_decay, level + 1

    maps -= maps.amin((1, 2), keepdim=True)
    return maps.div_(maps.amax((1, 2), keepdim=True))


@register_corruption("fog")
def fog(x: Tensor, context: CorruptionContext) -> Tensor:
    """Add a plasma-fractal haze (map side: next power of two of the image side), then rescale the range."""
    strength, wibble_decay = context.pick(
        imagenet=((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
        cifar=((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    )
    height, width = x.shape[-2:]
    map_size = 2 ** (max(height, width) - 1).bit_length()
    haze = _plasma_fractal(context.random, map_size, wibble_decay)[:, None, :height, :width]
    brightest = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * haze).mul_(brightest).div_(brightest + strength)  # in place: no more full-size buffers


@register_corruption("brightness")
def brightness(x: Tensor, context: CorruptionContext) -> Tensor:
    """Raise the HSV value channel."""
    shift = context.pick(imagenet=(0.1, 0.2, 0.3, 0.4, 0.5), cifar=(0.05, 0.1, 0.15, 0.2, 0.3))
    hue, saturation, value = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([hue, saturation, (value + shift).clamp(0.0, 1.0)], 1))


_WATER_RGB = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
_MUD_RGB = (63 / 255, 42 / 255, 20 / 255)
_SPATTER_EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])


@register_corruption("spatter")
def spatter(x: Tensor, context: CorruptionContext) -> Tensor:
    """Water drops (severities 1-3) or mud (4-5) from a thresholded, blurred Gaussian field (held-out corruption).

    Water follows the reference's OpenCV chain: Canny edges of the liquid layer, distance to them (capped at
    20), 3x3 blur, histogram equalisation, emboss filter, 3x3 blur; the result times the layer is the drop mask.
    """
    loc, scale, sigma, threshold, intensity, is_mud = context.pick(
        imagenet=(
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
        cifar=(
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ),
    )
    height, width = x.shape[-2:]
    liquid = gaussian_blur(context.random.normal("liquid", (1, height, width), mean=loc, std=scale), sigma)
    liquid = torch.where(liquid < threshold, 0.0, liquid)

    if is_mud:
        mud = gaussian_blur((liquid > threshold).to(x.dtype), intensity)
        mud = torch.where(mud < 0.8, 0.0, mud)
        return x * (1.0 - mud) + mud * torch.tensor(_MUD_RGB, device=x.device)[None, :, None, None]

    layer = torch.floor((liquid * 255.0).clamp(0.0, 255.0))
    distance = chamfer_distance_to(canny(layer, 50, 150), cap=20.0)
    shading = equalize_histogram(torch.floor(box_blur3(distance)))
    shading = filter2d(shading, _SPATTER_EMBOSS).clamp(0.0, 255.0)
    shading = torch.round(box_blur3(shading))
    drops = layer * shading
    drops = intensity * drops / drops.amax((2, 3), keepdim=True).clamp(min=1e-12)
    return x + drops * torch.tensor(_WATER_RGB, device=x.device)[None, :, None, None]
