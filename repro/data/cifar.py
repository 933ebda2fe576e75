"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): the python-pickle batches of the original release, or the hub."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from repro.data.base import ImageDataset, TensorSplit, register_dataset, resolve_data_dir
from repro.data.hub import load_hub_split
from repro.errors import UserError

# name: (release folder, train files, test files, label key, hub id, hub label column, classes, mean, std)
_SPECS = {
    "cifar10": (
        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
        "uoft-cs/cifar10", "label", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": (
        "cifar-100-python", ["train"], ["test"], b"fine_labels",
        "uoft-cs/cifar100", "fine_label", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers, and nothing else: a crafted batch file in
    ``--data-dir`` cannot name a function to call."""

    ALLOWED: ClassVar = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    try:
        with open(path, "rb") as handle:
            batch = _ArraysOnly(handle, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = [int(label) for label in batch[label_key]]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: not a CIFAR python batch ({type(err).__name__}: {err})") from None
    if len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels (truncated or damaged)")
    return images, labels


def _read_batches(folder: Path, files: list[str], label_key: bytes) -> TensorSplit:
    images, labels = [], []
    for name in files:
        batch_images, batch_labels = _read_batch(folder / name, label_key)
        images.append(batch_images)
        labels.extend(batch_labels)
    return TensorSplit(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


def _load_cifar(name: str, data_dir: Path | None, source: str, hub_id: str | None, revision: str | None
                ) -> ImageDataset:
    folder_name, train_files, test_files, label_key, default_hub, hub_label, classes, mean, std = _SPECS[name]
    data_dir = resolve_data_dir(data_dir)
    if source in ("auto", "local") and data_dir is not None:
        for folder in (data_dir / folder_name, data_dir):
            if all((folder / f).is_file() for f in train_files + test_files):
                train = _read_batches(folder, train_files, label_key)
                test = _read_batches(folder, test_files, label_key)
                return ImageDataset(name, train, test, classes, mean, std, str(folder))
    if source in ("auto", "hub"):
        hub_id = hub_id or default_hub
        try:
            train = load_hub_split(hub_id, "train", "img", hub_label, revision)
            test = load_hub_split(hub_id, "test", "img", hub_label, revision)
        except Exception as err:  # offline, missing, or gated: all mean "not available from the hub"
            raise UserError(
                f"{name} not found: put the python release folder {folder_name}/ under --data-dir or REPRO_DATA_DIR, "
                f"or go online so that `datasets` can fetch {hub_id} ({type(err).__name__})"
            ) from None
        return ImageDataset(name, train, test, classes, mean, std, f"hub:{hub_id}")
    raise UserError(f"{name}: no {folder_name}/ under {data_dir} (source={source})")


@register_dataset("cifar10", num_classes=10, train_images=50_000, test_images=10_000, channels=3, image_size=32)
def load_cifar10(data_dir: Path | None = None, source: str = "auto", hub_id: str | None = None,
                 revision: str | None = None) -> ImageDataset:
    return _load_cifar("cifar10", data_dir, source, hub_id, revision)


@register_dataset("cifar100", num_classes=100, train_images=50_000, test_images=10_000, channels=3, image_size=32)
def load_cifar100(data_dir: Path | None = None, source: str = "auto", hub_id: str | None = None,
                  revision: str | None = None) -> ImageDataset:
    return _load_cifar("cifar100", data_dir, source, hub_id, revision)
