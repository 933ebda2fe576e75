"""Small generated datasets written in the real on-disk layouts.

Smoke tiers of suites whose data cannot be downloaded here (CIFAR, ImageNet) and the loader tests use these
files, so they exercise the same loading code as a full run. The images are class-dependent (a per-class
template plus noise), so a model can learn them and a falling loss means something.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from repro.data.idx import write_idx


def class_images(num_classes: int, per_class: int, channels: int, size: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×C×H×W images: a smooth random template per class plus pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, channels, 4, 4))
    templates = np.kron(coarse, np.ones((1, 1, -(-size // 4), -(-size // 4))))[:, :, :size, :size]
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = rng.normal(0, 40, size=(len(labels), channels, size, size))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def write_fashion_mnist(root: Path, train: int = 200, test: int = 100, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = class_images(10, -(-n // 10), 1, 28, seed)
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", torch.from_numpy(images[:n, 0]))
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", torch.from_numpy(labels[:n].astype(np.uint8)))
    return root


def write_cifar(root: Path, num_classes: int = 10, train: int = 200, test: int = 100) -> Path:
    """The python-pickle release: ``cifar-10-batches-py/data_batch_{1..5}`` or ``cifar-100-python/{train,test}``."""
    if num_classes == 10:
        folder, names, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        test_names = ["test_batch"]
    else:
        folder, names, label_key, test_names = root / "cifar-100-python", ["train"], b"fine_labels", ["test"]
    folder.mkdir(parents=True, exist_ok=True)
    for files, n, seed in ((names, train, 0), (test_names, test, 1)):
        images, labels = class_images(num_classes, -(-n // num_classes), 3, 32, seed)
        for chunk, name in zip(np.array_split(np.arange(n), len(files)), files, strict=True):
            batch = {b"data": images[chunk].reshape(len(chunk), -1), label_key: labels[chunk].tolist()}
            with open(folder / name, "wb") as handle:
                pickle.dump(batch, handle)
    return root


def write_image_folder(root: Path, num_classes: int = 4, per_class: int = 6, size: int = 64, splits=("train", "val")
                       ) -> Path:
    """``<root>/<split>/<class>/<image>.JPEG``, the ImageNet layout (class folders named like WordNet ids)."""
    from PIL import Image

    for seed, split in enumerate(splits):
        images, labels = class_images(num_classes, per_class, 3, size, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"img_{i:05d}.JPEG", quality=95)
    return root


def write_hub_parquet(root: Path, image_column: str, label_column: str, channels: int, size: int, num_classes: int,
                      train: int = 60, test: int = 30) -> Path:
    """A local folder of parquet files laid out like a hub dataset repo (``<split>-*.parquet``)."""
    import datasets
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(num_classes)})
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        images, labels = class_images(num_classes, -(-n // num_classes), channels, size, seed)
        pil = [Image.fromarray(im[0] if channels == 1 else im.transpose(1, 2, 0)) for im in images[:n]]
        table = datasets.Dataset.from_dict({image_column: pil, label_column: labels[:n].tolist()}, features=features)
        table.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


#: dataset name -> writer of a small copy in that dataset's own layout, returning the data_dir to load from.
GENERATORS: dict[str, Callable[[Path], Path]] = {
    "fashion_mnist": write_fashion_mnist,
    "cifar10": lambda root: write_cifar(root, 10),
    "cifar100": lambda root: write_cifar(root, 100, train=400, test=200),
    "imagenet": write_image_folder,
}
