"""The corruption registry, the per-call context and the public ``corrupt`` entry point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from repro.corruptions.ops import luminance
from repro.corruptions.random_stream import RandomStream
from repro.errors import UserError
from repro.registry import Registry

T = TypeVar("T")

SEVERITIES = (1, 2, 3, 4, 5)
LOW_RESOLUTION_BELOW = 64  # images with a side below this get make_cifar_c.py's parameters
MIN_SIDE = 16


@dataclass(frozen=True)
class CorruptionContext:
    """What a corruption function needs besides the images: severity, random numbers, parameter regime."""

    severity: int
    random: RandomStream
    low_resolution: bool

    def pick(self, imagenet: Sequence[T], cifar: Sequence[T]) -> T:
        """This severity's parameters: ImageNet-C's, or CIFAR-10-C's (make_cifar_c.py) for low resolution."""
        return (cifar if self.low_resolution else imagenet)[self.severity - 1]


CorruptionFunction = Callable[[Tensor, CorruptionContext], Tensor]
"""Takes float32 ``(N, 3, H, W)`` RGB in [0, 1], returns the corrupted images in the same layout as a new tensor
(``corrupt`` finishes it in place: fewer full-size buffers, which cost page faults); or, if registered with
``register_level_corruption``, uint8 ``(N, 3, H, W)`` RGB levels in and out."""

CORRUPTION_REGISTRY: Registry[CorruptionFunction] = Registry("corruption")
register_corruption = CORRUPTION_REGISTRY.register


def register_level_corruption(name: str) -> Callable[[CorruptionFunction], CorruptionFunction]:
    """``register_corruption`` for a corruption defined on uint8 levels (Pillow's pixelate, JPEG): it is handed
    the uint8 images and returns uint8, skipping the float round trip that would cost more than the work."""

    def decorator(function: CorruptionFunction) -> CorruptionFunction:
        function.takes_levels = True  # type: ignore[attr-defined]
        return register_corruption(name)(function)

    return decorator


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0, indices: Tensor | None = None) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to uint8 ``(N, C, H, W)`` images, C = 1 or 3.

    Image ``i`` draws its random numbers from ``(seed, name, indices[i])`` (default ``indices = arange(N)``),
    so its output does not depend on the rest of the batch. Returns uint8 of the same shape on the same device.
    Grayscale images are corrupted as RGB copies of themselves and returned as BT.601 luma of the clipped
    result: colour effects (frost, spatter, saturate) survive as brightness changes, and per-channel noise is
    averaged by the luma weights (its standard deviation shrinks to about 0.67x).
    """
    function = CORRUPTION_REGISTRY.get(name)
    _check_severity(severity)
    _check_images(images)
    indices = _check_indices(indices, images)
    if images.shape[0] == 0:
        return images.clone()

    height, width = images.shape[-2:]
    context = CorruptionContext(
        severity=severity,
        random=RandomStream(seed, name, indices),
        low_resolution=min(height, width) < LOW_RESOLUTION_BELOW,
    )
    if getattr(function, "takes_levels", False):
        corrupted = function(images.expand(-1, 3, -1, -1), context)
        if images.shape[1] == 3:
            return corrupted
        corrupted = corrupted.to(torch.float32).div_(255.0)
    else:
        corrupted = function(images.to(torch.float32).div_(255.0).expand(-1, 3, -1, -1), context)
    if images.shape[1] == 1:
        corrupted = luminance(corrupted.clamp_(0.0, 1.0))
    return truncate_to_levels(corrupted.mul_(255.0))


def truncate_to_levels(values: Tensor) -> Tensor:
    """Float values on the 0-255 scale -> uint8 levels, in place: ``np.uint8(x * 255)`` truncates, as the
    reference does; the 1e-3 guards float32 round-off below an integer; clamping to [0, 255] here gives the same
    levels as clamping to [0, 1] before scaling; the uint8 cast truncates."""
    return values.add_(1e-3).clamp_(0.0, 255.0).to(torch.uint8)


def _check_severity(severity: object) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"corruption severity must be an integer in 1..5, got {severity!r}")


def _check_images(images: object) -> None:
    if not isinstance(images, Tensor):
        raise UserError(f"corrupt() expects a torch.Tensor of images, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(
            f"corrupt() expects uint8 images of shape (N, C, H, W) with C = 1 or 3, "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if min(images.shape[-2:]) < MIN_SIDE:
        raise UserError(f"corrupt() needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got {tuple(images.shape)}")


def _check_indices(indices: Tensor | None, images: Tensor) -> Tensor:
    count = images.shape[0]
    if indices is None:
        return torch.arange(count, device=images.device)
    if (
        not isinstance(indices, Tensor)
        or indices.shape != (count,)
        or indices.dtype.is_floating_point
        or indices.dtype.is_complex
        or indices.dtype == torch.bool
    ):
        raise UserError(f"indices must be an integer tensor of shape ({count},), one dataset index per image")
    return indices.to(images.device, torch.int64)
