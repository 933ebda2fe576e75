"""The reference implementation, runnable on today's stack, for validating and benchmarking ``repro.corruptions``.

From 64 px this is ``imagecorruptions`` 1.1.2 (PyPI) unchanged apart from four runtime shims, applied to the
loaded module only (site-packages is not edited):

* ``pkg_resources`` (gone from Python >= 3.12 environments) is stubbed while the module imports;
* ``np.float_`` (removed in NumPy 2) resolves to ``np.float64`` through a numpy proxy in the module;
* skimage ``gaussian(multichannel=True)`` (removed in scikit-image 0.21) becomes ``channel_axis=-1``;
* skimage ``random_noise`` gets an ``rng`` drawn from numpy's legacy global RNG, so that impulse noise follows
  the seed like every other corruption (scikit-image now ignores ``np.random.seed``).

Below 64 px it is CIFAR-10-C (Hendrycks' ``make_cifar_c.py``): the imagecorruptions functions recompiled with
make_cifar_c.py's severity tables (transcribed below, independently of the tables in ``repro.corruptions``),
except frost and elastic_transform, whose CIFAR algorithms differ and are restated here with the same libraries.
make_cifar_c.py's ImageMagick motion blur (motion_blur, snow) is not available; the numpy one stands in.

Needs ``imagecorruptions`` and ``scikit-image`` (which pull in OpenCV and SciPy).

Why 1.1.2 and not its maintained fork ``imagecorruptions-imaug`` 1.1.5 (which needs none of the shims): the fork
passes the agreement tests in ``tests/test_corruptions.py`` when impulse noise and glass blur get ``seed=`` (its
numba glass blur then draws exactly what 1.1.2 draws), but its frost picks among six textures
(``randint(6)``), where 1.1.2 and Hendrycks' original code pick among the first five; for one seed in six the
frost image differs entirely (seeds 1 and 19 at 224 px: mean change 43 and 66 levels; the tests' seeds 11-13
happen not to hit it). It also installs numba and llvmlite (about 210 MB). ``benchmarks/corruptions.py``
times both.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import sys
import textwrap
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from repro.corruptions.core import LOW_RESOLUTION_BELOW
from repro.errors import UserError

ReferenceFunction = Callable[[Image.Image, int], Any]

# Severity tables of make_cifar_c.py (hendrycks/robustness), for the functions it shares with imagecorruptions.
_MAKE_CIFAR_C_TABLES: dict[str, list[Any]] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "snow": [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ],
    "spatter": [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
}
_CIFAR_FROST = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)]
_CIFAR_ELASTIC = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]


class _NumpyWithFloatAlias(types.ModuleType):
    """numpy, plus the ``float_`` alias that NumPy 2 removed."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@functools.cache
def reference_module() -> types.ModuleType:
    """``imagecorruptions.corruptions`` with the shims applied (imported once)."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or spec.origin is None:
        raise UserError("the reference corruptions need `pip install imagecorruptions scikit-image`")
    package_dir = Path(spec.origin).parent
    added_stub = "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None
    if added_stub:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda _package, relative: str(package_dir / relative)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stub
    try:
        with warnings.catch_warnings():  # it imports the deprecated scipy.ndimage.interpolation
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module("imagecorruptions.corruptions")
    finally:
        if added_stub:
            del sys.modules["pkg_resources"]

    import skimage
    import skimage.filters
    import skimage.util

    def gaussian(image: np.ndarray, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> np.ndarray:
        if multichannel:
            kwargs["channel_axis"] = -1
        return skimage.filters.gaussian(image, *args, **kwargs)

    def random_noise(image: np.ndarray, **kwargs: Any) -> np.ndarray:
        return skimage.util.random_noise(image, rng=np.random.randint(2**31), **kwargs)

    module.np = _NumpyWithFloatAlias("numpy")
    module.gaussian = gaussian
    module.sk = types.SimpleNamespace(color=skimage.color, util=types.SimpleNamespace(random_noise=random_noise))
    return module


def _with_severity_table(function: ReferenceFunction, table: list[Any]) -> ReferenceFunction:
    """Recompile a reference function with its ``c = [...][severity - 1]`` table replaced by ``table``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    assert isinstance(definition, ast.FunctionDef)
    for statement in definition.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        if [getattr(target, "id", None) for target in targets] == ["c"]:
            assert isinstance(statement.value, ast.Subscript)
            statement.value.value = ast.Name("_SEVERITY_TABLE", ast.Load())
            break
    else:
        raise RuntimeError(f"no severity table found in reference {function.__name__}")
    namespace = dict(vars(reference_module()), _SEVERITY_TABLE=table)
    exec(compile(ast.fix_missing_locations(tree), inspect.getsourcefile(function) or "<reference>", "exec"), namespace)
    return namespace[function.__name__]


def _cifar_frost(image: Image.Image, severity: int) -> np.ndarray:
    """make_cifar_c.py's frost: textures shrunk 5x (bilinear), random crop, blend."""
    import cv2

    image_weight, frost_weight = _CIFAR_FROST[severity - 1]
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    frost_dir = Path(inspect.getsourcefile(reference_module()) or "").parent / "frost"
    name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"][np.random.randint(5)]
    texture = cv2.resize(cv2.imread(str(frost_dir / name)), (0, 0), fx=0.2, fy=0.2)
    top = np.random.randint(0, texture.shape[0] - height)
    left = np.random.randint(0, texture.shape[1] - width)
    crop = texture[top : top + height, left : left + width][..., ::-1]
    return np.clip(image_weight * pixels + frost_weight * crop, 0, 255)


def _cifar_elastic(image: Image.Image, severity: int) -> np.ndarray:
    """make_cifar_c.py's elastic transform: random 3-point affine (reflect101), then a smooth displacement."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    height, width = pixels.shape[:2]
    alpha, sigma, jitter = (32 * value for value in _CIFAR_ELASTIC[severity - 1])
    centre = np.float32([width // 2, height // 2])
    half = min(height, width) // 3
    anchors = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    moved = anchors + np.random.uniform(-jitter, jitter, size=anchors.shape).astype(np.float32)
    warped = cv2.warpAffine(
        pixels, cv2.getAffineTransform(anchors, moved), (width, height), borderMode=cv2.BORDER_REFLECT_101
    )
    shift_x = gaussian(np.random.uniform(-1, 1, size=(height, width)), sigma, mode="reflect", truncate=3) * alpha
    shift_y = gaussian(np.random.uniform(-1, 1, size=(height, width)), sigma, mode="reflect", truncate=3) * alpha
    rows, cols, channels = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    coordinates = (rows + shift_y[..., None], cols + shift_x[..., None], channels)
    resampled = map_coordinates(warped, [c.reshape(-1) for c in coordinates], order=1, mode="reflect")
    return np.clip(resampled.reshape(pixels.shape), 0, 1) * 255


@functools.cache
def reference_function(name: str, low_resolution: bool) -> ReferenceFunction:
    """The reference's ``function(pil_image, severity)`` for ``name`` in the given parameter regime."""
    function = getattr(reference_module(), name)
    if not low_resolution:
        return function
    if name == "frost":
        return _cifar_frost
    if name == "elastic_transform":
        return _cifar_elastic
    return _with_severity_table(function, _MAKE_CIFAR_C_TABLES[name])


def reference_corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one ``(H, W, 3)`` uint8 image with the reference, numpy's global RNG seeded with ``seed``.

    The global RNG state is restored afterwards. Returns ``(H, W, 3)`` uint8, truncated like
    ``imagecorruptions.corrupt``.
    """
    function = reference_function(name, min(image.shape[:2]) < LOW_RESOLUTION_BELOW)
    saved_state = np.random.get_state()
    np.random.seed(seed)
    try:
        corrupted = function(Image.fromarray(image), severity)
    finally:
        np.random.set_state(saved_state)
    return np.uint8(corrupted)
