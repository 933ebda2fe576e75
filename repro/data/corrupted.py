"""The released corruption benchmarks as *views*: ``view(corruption, severity) -> (images, labels)``.

- ImageNet-C (Hendrycks & Dietterich 2019): the JPEG tree ``<root>/<corruption>/<severity>/<class>/<image>``.
  50,000 images per view do not fit in memory as one tensor, so ``images`` is a Dataset that decodes with PIL
  (in DataLoader workers) and center-crops to 224 as hendrycks' ``ImageNet-C/test.py`` does; the released
  images are already 224×224, so the crop only guards against other sizes.
- CIFAR-10-C / CIFAR-100-C: ``<root>/<corruption>.npy``, uint8 N×32×32×3 holding the five severities one
  after another (10,000 rows each, in test-set order), and ``<root>/labels.npy``. ``images`` is a tensor.

``GeneratedView`` corrupts any in-memory split on the fly (``repro.corruptions``, batched on the device, with
an optional disk cache) and has the same signature, so evaluation code does not care where the images come from.
``subset_view`` and ``in_memory`` adapt a released view to an evaluation that reads every view many times.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from repro.corruptions import corrupt
from repro.data.base import TensorSplit, subset_indices
from repro.data.imagenet import scan_image_folder
from repro.errors import UserError
from repro.store.atomic import atomic_path

SEVERITIES = (1, 2, 3, 4, 5)

#: uint8 N×C×H×W images, or a map-style Dataset whose items are uint8 C×H×W tensors.
ImageSource = torch.Tensor | Dataset
CorruptionView = Callable[[str, int], tuple[ImageSource, torch.Tensor]]


def _check_severity(severity: int) -> None:
    if severity not in SEVERITIES:
        raise UserError(f"severity {severity!r}; allowed: {', '.join(map(str, SEVERITIES))}")


def cifar_c_view(root: Path | str) -> CorruptionView:
    """A view of a CIFAR-10-C or CIFAR-100-C folder; only the rows of the requested severity are read."""
    root = Path(root)
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise UserError(f"{root}: no labels.npy (expected the CIFAR-10-C / CIFAR-100-C release layout)")
    all_labels = torch.from_numpy(np.load(labels_path).astype(np.int64))

    def view(corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_severity(severity)
        path = root / f"{corruption}.npy"
        if not path.is_file():
            available = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
            raise UserError(f"{root}: no {corruption}.npy; available: {', '.join(available)}")
        array = np.load(path, mmap_mode="r")
        if array.dtype != np.uint8 or array.ndim != 4 or len(array) % len(SEVERITIES):
            raise UserError(f"{path}: expected uint8 N×H×W×C with N a multiple of {len(SEVERITIES)}, "
                            f"got {array.dtype} {array.shape}")
        per_severity = len(array) // len(SEVERITIES)
        rows = slice((severity - 1) * per_severity, severity * per_severity)
        images = torch.from_numpy(np.ascontiguousarray(array[rows].transpose(0, 3, 1, 2)))
        if len(all_labels) == len(array):
            labels = all_labels[rows]
        elif len(all_labels) == per_severity:
            labels = all_labels
        else:
            raise UserError(f"{labels_path}: {len(all_labels)} labels for {len(array)} rows in {path.name}")
        return images, labels

    return view


class ImageFiles(Dataset):
    """Image files decoded to uint8 C×H×W and center-cropped (padded with zeros if smaller, as CenterCrop)."""

    def __init__(self, files: list[Path], crop_size: int) -> None:
        self.files = files
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional

        with Image.open(self.files[index]) as image:
            pixels = functional.pil_to_tensor(image.convert("RGB"))
        return functional.center_crop(pixels, [self.crop_size, self.crop_size])


def imagenet_c_view(root: Path | str, *, crop_size: int = 224, classes: list[str] | None = None) -> CorruptionView:
    """A view of the ImageNet-C tree. Labels are indices into ``classes`` (default: each view's sorted class folders).

    Pass the clean dataset's class names as ``classes`` to make sure labels mean the same in every view even if
    a folder is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet-C root {root} does not exist")

    def view(corruption: str, severity: int) -> tuple[ImageFiles, torch.Tensor]:
        _check_severity(severity)
        folder = root / corruption / str(severity)
        if not folder.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise UserError(f"{root}: no {corruption}/{severity}/ folder; corruptions found: {', '.join(available)}")
        split, found = scan_image_folder(folder, crop_size)
        labels = split.labels
        if classes is not None:
            index = {name: i for i, name in enumerate(classes)}
            unknown = [name for name in found if name not in index]
            if unknown:
                raise UserError(f"{folder}: class folders not in the given classes: {unknown[:5]}")
            labels = torch.tensor([index[name] for name in found], dtype=torch.int64)[labels]
        return ImageFiles(split.files, crop_size), labels

    return view


#: Bump when a change to ``repro.corruptions`` changes its output, so that cached views are not reused.
CACHE_VERSION = 1
#: Bytes of generated views one process keeps in memory, by device type. The runs of a suite corrupt the same test
#: split with the same seed, so every run after the first takes its views from here; the least recently used go
#: first. A view larger than the budget is not kept.
VIEWS_IN_MEMORY_BYTES = {"cuda": 8 << 30, "cpu": 2 << 30}
_views_in_memory: OrderedDict[tuple[str, str, str, int], torch.Tensor] = OrderedDict()


def _keep_in_memory(key: tuple[str, str, str, int], images: torch.Tensor) -> None:
    """Keep ``images`` within its device type's budget, dropping that device type's least recently used views."""
    device_type = images.device.type
    budget = VIEWS_IN_MEMORY_BYTES.get(device_type, 0)
    if _bytes(images) > budget:
        return
    _views_in_memory[key] = images
    same_device = [kept for kept, view in _views_in_memory.items() if view.device.type == device_type]
    used = sum(_bytes(_views_in_memory[kept]) for kept in same_device)
    for oldest in same_device:
        if used <= budget:
            break
        used -= _bytes(_views_in_memory.pop(oldest))


def _bytes(images: torch.Tensor) -> int:
    return images.numel() * images.element_size()


class GeneratedView:
    """A split corrupted on the fly: ``view(corruption, severity) -> (uint8 images on device, labels)``.

    Image i of the split is corrupted with dataset index i (``corrupt(..., indices=...)``), so the result does not
    depend on ``batch_size``, which only bounds the memory of one ``corrupt`` call. The whole corrupted view is
    returned as one tensor on ``device`` (a 50,000-image ImageNet view is 7.5 GB of uint8). With ``cache_dir``
    each view is also written there as ``.npy``, keyed by the split's fingerprint, the seed and ``CACHE_VERSION``,
    and read back instead of recomputed. Views also stay in this process's memory, on their device, for the next
    run of the same split and seed (``VIEWS_IN_MEMORY_BYTES``); they are shared, so callers must not modify them.
    ``images`` and ``seconds`` count what was computed (the throughput).
    """

    def __init__(self, split: TensorSplit, *, seed: int = 0, device: torch.device | str = "cpu",
                 batch_size: int = 256, cache_dir: Path | str | None = None) -> None:
        self.split = split
        self.seed = seed
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.images = 0
        self.seconds = 0.0

    @functools.cached_property
    def key(self) -> str:
        """What a view's pixels depend on besides the corruption and severity."""
        return f"{self.split.fingerprint()}-seed{self.seed}-v{CACHE_VERSION}"

    def cache_path(self, corruption: str, severity: int) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / self.key / f"{corruption}-{severity}.npy"

    def __call__(self, corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_severity(severity)
        in_memory = (self.key, str(self.device), corruption, severity)
        if in_memory in _views_in_memory:
            _views_in_memory.move_to_end(in_memory)
            return _views_in_memory[in_memory], self.split.labels
        path = self.cache_path(corruption, severity)
        if path is not None and path.is_file():
            images = torch.from_numpy(np.load(path)).to(self.device)
            _keep_in_memory(in_memory, images)
            return images, self.split.labels
        began = time.perf_counter()
        parts = []
        for start in range(0, len(self.split), self.batch_size):
            batch = self.split.images[start : start + self.batch_size].to(self.device)
            indices = torch.arange(start, start + len(batch), device=self.device)
            parts.append(corrupt(batch, corruption, severity, self.seed, indices=indices))
        images = torch.cat(parts)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - began
        self.images += len(images)
        if path is not None:
            with atomic_path(path) as partial, open(partial, "wb") as out:  # a path would gain a second .npy
                np.save(out, images.cpu().numpy())
        _keep_in_memory(in_memory, images)
        return images, self.split.labels


def subset_view(view: CorruptionView, n: int | None) -> CorruptionView:
    """Every view cut to ``n`` images by the rule of ``TensorSplit.subset`` (the same rows in every view)."""

    def cut(corruption: str, severity: int) -> tuple[ImageSource, torch.Tensor]:
        images, labels = view(corruption, severity)
        order = subset_indices(len(labels), n)
        if order is None:
            return images, labels
        return (images[order] if isinstance(images, torch.Tensor) else Subset(images, order.tolist())), labels[order]

    return cut


def in_memory(view: CorruptionView, workers: int = 0) -> CorruptionView:
    """Decode a file-backed view once into a uint8 tensor, for evaluations that read the same view many times."""

    def read(corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = view(corruption, severity)
        if not isinstance(images, torch.Tensor):
            images = torch.cat(list(DataLoader(images, batch_size=64, num_workers=workers)))
        return images, labels

    return read
