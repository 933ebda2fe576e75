"""Dataset containers and the dataset registry.

Small datasets (Fashion-MNIST, CIFAR) are held whole as uint8 tensors so that they can live on the training
device; ImageNet-sized ones are folder trees streamed through decoding workers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro.errors import UserError
from repro.registry import Registry


@dataclass(frozen=True)
class TensorSplit:
    """A whole split in memory: uint8 images N×C×H×W and int64 labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, n: int | None, seed: int = 0) -> TensorSplit:
        """The first ``n`` images of a fixed permutation, so every run of a suite sees the same subset."""
        order = subset_indices(len(self), n, seed)
        return self if order is None else TensorSplit(self.images[order], self.labels[order])

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FolderSplit:
    """A split kept on disk as image files (ImageNet layout); decoded by loader workers."""

    files: list[Path]
    labels: torch.Tensor
    image_size: int = 224

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, n: int | None, seed: int = 0) -> FolderSplit:
        order = subset_indices(len(self), n, seed)
        if order is None:
            return self
        return FolderSplit([self.files[i] for i in order.tolist()], self.labels[order], self.image_size)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path, label in zip(self.files, self.labels.tolist(), strict=True):
            digest.update(f"{path.parent.name}/{path.name}:{path.stat().st_size}:{label}\n".encode())
        return digest.hexdigest()[:16]


Split = TensorSplit | FolderSplit


def subset_indices(length: int, n: int | None, seed: int = 0) -> torch.Tensor | None:
    """The sorted first ``n`` of a fixed permutation of ``range(length)``; None when ``n`` keeps everything.

    One rule for every split and for the released corruption files, so that a subset of CIFAR-10-C (whose rows
    follow the test set) holds the same images as the clean test split cut to the same size.
    """
    if n is None or n >= length:
        return None
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def resolve_data_dir(data_dir: Path | None) -> Path | None:
    """The folder given on the command line, else ``REPRO_DATA_DIR``, else none."""
    if data_dir is None and os.environ.get("REPRO_DATA_DIR"):
        data_dir, flag = Path(os.environ["REPRO_DATA_DIR"]), "REPRO_DATA_DIR="
    else:
        flag = "--data-dir "
    if data_dir is not None and not Path(data_dir).is_dir():  # never fall back to another copy in silence
        raise UserError(f"{flag}{data_dir}: no such folder")
    return data_dir


@dataclass(frozen=True)
class ImageDataset:
    """Train and test splits plus what a model and a loader need to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    class_names: list[str] = field(default_factory=list)

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def fingerprint(self) -> str:
        return hashlib.sha256((self.train.fingerprint() + self.test.fingerprint()).encode()).hexdigest()[:16]

    def subset(self, train: int | None, test: int | None) -> ImageDataset:
        return ImageDataset(
            self.name, self.train.subset(train), self.test.subset(test), self.num_classes, self.mean, self.std,
            self.source, self.class_names,
        )


@dataclass(frozen=True)
class DatasetShape:
    """The full splits' sizes and the image shape of a registered dataset, known without loading it."""

    train_images: int
    test_images: int
    channels: int
    image_size: int
    num_classes: int


DatasetLoader = Callable[..., ImageDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(name: str, *, num_classes: int, train_images: int, test_images: int, channels: int,
                     image_size: int) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register ``fn(data_dir: Path | None, source: str, **kwargs) -> ImageDataset`` under ``name``.

    Its ``DatasetShape`` stays on the entry (``loader.shape``), so that a record can be read against chance level
    and a plan's time estimated without loading data.
    """

    shape = DatasetShape(train_images, test_images, channels, image_size, num_classes)

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        loader.shape = shape  # type: ignore[attr-defined]
        return DATASETS.register(name)(loader)

    return decorator
