"""Datasets as uint8 tensors (or image folders), loaded from local copies, Debian, or the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

from repro.data import cifar, fashion_mnist, imagenet  # noqa: F401  (registration side effect)
from repro.data.base import DATASETS, FolderSplit, ImageDataset, TensorSplit, register_dataset
from repro.data.generated import GENERATORS
from repro.data.loaders import DeviceLoader, FolderLoader, make_loader
from repro.errors import UserError


def cache_root() -> Path:
    """Where generated datasets and cached corrupted views go: ``REPRO_CACHE_DIR``, else ``~/.cache/repro``."""
    return Path(os.environ.get("REPRO_CACHE_DIR", Path.home() / ".cache" / "repro"))


def generated_data_dir(name: str) -> Path:
    """Write (once) and return a small generated copy of ``name`` in its real layout."""
    root = cache_root() / "generated" / name
    marker = root / ".complete"
    if not marker.exists():
        if name not in GENERATORS:
            raise UserError(f"no generated stand-in for dataset {name!r}; allowed: {', '.join(sorted(GENERATORS))}")
        GENERATORS[name](root)
        marker.touch()
    return root


def load_dataset(name: str, data_dir: Path | None = None, source: str = "auto", generated: bool = False,
                 **kwargs) -> ImageDataset:
    """Load a registered dataset; ``generated=True`` loads a small generated copy through the same code path."""
    loader = DATASETS.get(name)
    if generated:
        return loader(data_dir=generated_data_dir(name), source="local", **kwargs)
    return loader(data_dir=Path(data_dir) if data_dir else None, source=source, **kwargs)


__all__ = [
    "DATASETS",
    "DeviceLoader",
    "FolderLoader",
    "FolderSplit",
    "ImageDataset",
    "TensorSplit",
    "cache_root",
    "load_dataset",
    "make_loader",
    "register_dataset",
]
