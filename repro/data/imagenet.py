"""ImageNet-1k as a local ImageFolder tree (``<root>/{train,val}/<class>/<image>``)."""

from __future__ import annotations

from pathlib import Path

import torch

from repro.data.base import FolderSplit, ImageDataset, register_dataset, resolve_data_dir
from repro.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}


def scan_image_folder(root: Path, image_size: int = 224) -> tuple[FolderSplit, list[str]]:
    """Classes are the sorted sub-folder names, as in torchvision's ImageFolder and the hub's imagefolder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    if not files:
        raise UserError(f"{root}: no images in <class>/<image> sub-folders")
    return FolderSplit(files, torch.tensor(labels, dtype=torch.int64), image_size), classes


@register_dataset("imagenet", num_classes=1000, train_images=1_281_167, test_images=50_000, channels=3,
                  image_size=224)
def load_imagenet(data_dir: Path | None = None, source: str = "auto", image_size: int = 224) -> ImageDataset:
    """The ILSVRC-2012 tree; the hub copy (``ILSVRC/imagenet-1k``) is gated, so export it to this layout first."""
    data_dir = resolve_data_dir(data_dir)
    roots = [data_dir / "imagenet", data_dir] if data_dir else []
    for root in roots:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train, classes = scan_image_folder(root / "train", image_size)
            test, val_classes = scan_image_folder(root / "val", image_size)
            if classes != val_classes:
                raise UserError(f"{root}: train/ and val/ have different class folders")
            return ImageDataset("imagenet", train, test, len(classes), MEAN, STD, str(root), classes)
    raise UserError(
        "ImageNet not found: pass --data-dir (or REPRO_DATA_DIR) pointing at a folder with train/<class>/*.JPEG and "
        "val/<class>/*.JPEG (the hub's ILSVRC/imagenet-1k is gated; export it to that layout once)"
    )
