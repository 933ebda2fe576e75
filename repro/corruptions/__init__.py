"""ImageNet-C / CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) as batched, seeded torch ops.

``corrupt(images, name, severity, seed, indices)`` corrupts uint8 ``(N, C, H, W)`` images (C = 1 or 3, sides of
at least 16 px) on CPU or CUDA. Parameters follow the reference implementations: ImageNet-C's
(``imagecorruptions`` 1.1.2) for images whose shorter side is at least 64 px, CIFAR-10-C's (Hendrycks'
``make_cifar_c.py``) below that, because the ImageNet kernels, zooms and textures are far too large for 32 px
images. Randomness is counter-based (see ``random_stream``): an image gets the same corruption for the same
``(seed, index)`` in any batch. Frost reads the reference's texture photos from the installed ``imagecorruptions``
package or from ``$REPRO_FROST_DIR``. ``reference`` runs the reference itself (tests, benchmarks).
"""

from repro.corruptions import blur, digital, noise, weather  # noqa: F401  (registration side effect)
from repro.corruptions.core import (
    CORRUPTION_REGISTRY,
    LOW_RESOLUTION_BELOW,
    SEVERITIES,
    CorruptionContext,
    corrupt,
    register_corruption,
)
from repro.corruptions.weather import FROST_DIR_ENV

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 benchmark corruptions, in the paper's order (noise, blur, weather, digital)."""

EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The 4 held-out corruptions, meant for choosing hyper-parameters without touching the benchmark 15."""

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_REGISTRY",
    "EXTRA_CORRUPTIONS",
    "FROST_DIR_ENV",
    "LOW_RESOLUTION_BELOW",
    "SEVERITIES",
    "CorruptionContext",
    "corrupt",
    "register_corruption",
]
