"""The released corruption benchmarks as *views*: ``view(corruption, severity) -> (images, labels)``.

- ImageNet-C (Hendrycks & Dietterich 2019): the JPEG tree ``<root>/<corruption>/<severity>/<class>/<image>``.
  50,000 images per view do not fit in memory as one tensor, so ``images`` is a Dataset that decodes with PIL
  (in DataLoader workers) and center-crops to 224 as hendrycks' ``ImageNet-C/test.py`` does; the released
  images are already 224×224, so the crop only guards against other sizes.
- CIFAR-10-C / CIFAR-100-C: ``<root>/<corruption>.npy``, uint8 N×32×32×3 holding the five severities one
  after another (10,000 rows each, in test-set order), and ``<root>/labels.npy``. ``images`` is a tensor.

An on-the-fly corrupted view (``repro.corruptions``) has the same signature, so evaluation code does not
care where the images come from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from repro.data.imagenet import scan_image_folder
from repro.errors import UserError

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
