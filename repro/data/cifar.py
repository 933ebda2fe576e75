"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): the python-pickle batches of the original release, or the hub."""

from __future__ import annotations

import pickle
from pathlib import Path

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


def _read_batches(folder: Path, files: list[str], label_key: bytes) -> TensorSplit:
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
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


@register_dataset("cifar10")
def load_cifar10(data_dir: Path | None = None, source: str = "auto", hub_id: str | None = None,
                 revision: str | None = None) -> ImageDataset:
    return _load_cifar("cifar10", data_dir, source, hub_id, revision)


@register_dataset("cifar100")
def load_cifar100(data_dir: Path | None = None, source: str = "auto", hub_id: str | None = None,
                  revision: str | None = None) -> ImageDataset:
    return _load_cifar("cifar100", data_dir, source, hub_id, revision)
