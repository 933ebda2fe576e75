"""Fashion-MNIST (Xiao et al. 2017): 60k/10k 28×28 grayscale images of 10 clothing classes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from repro.data.base import ImageDataset, TensorSplit, register_dataset, resolve_data_dir
from repro.data.hub import load_hub_split
from repro.data.idx import read_idx
from repro.errors import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_ID = "zalando-datasets/fashion_mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel statistics of the 60k training images in [0, 1] (tests recompute them from the data).
MEAN, STD = (0.2860,), (0.3530,)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def has_idx_files(directory: Path) -> bool:
    return all(find_idx_file(directory, stem) for pair in FILES.values() for stem in pair)


def load_idx_dir(directory: Path) -> tuple[TensorSplit, TensorSplit]:
    """The train and test splits of a folder of the four IDX files; a file that is truncated, or labels that do
    not match their images, is a one-line error naming the file."""
    splits = []
    for images_stem, labels_stem in FILES.values():
        images_path, labels_path = find_idx_file(directory, images_stem), find_idx_file(directory, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != torch.uint8:
            raise UserError(f"{images_path}: not Fashion-MNIST images (uint8 N x 28 x 28, got {images.dtype} "
                            f"{tuple(images.shape)}); download it again")
        if labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"{labels_path}: {labels.numel()} labels for the {len(images)} images of "
                            f"{images_path.name}; download both again")
        splits.append(TensorSplit(images[:, None].contiguous(), labels.long()))
    return splits[0], splits[1]


def idx_folder(data_dir: Path | None, source: str = "auto") -> tuple[Path | None, str | None]:
    """The first folder holding all four IDX files, ``data_dir``'s (or a fashion-mnist/ folder in it) then
    Debian's, as ``source`` allows; and, when a folder of ``data_dir`` holds only some of them, which it lacks:
    the data then comes from elsewhere, and ``warn_partial_copy`` says so."""
    local = [data_dir, data_dir / "fashion-mnist", data_dir / "fashion_mnist"] if data_dir is not None else []
    local = local if source in ("auto", "local") else []
    candidates = local + ([DEBIAN_DIR] if source in ("auto", "debian") else [])
    stems = [stem for pair in FILES.values() for stem in pair]
    partial = None
    for folder in local:
        lacking = [stem for stem in stems if find_idx_file(folder, stem) is None]
        if 0 < len(lacking) < len(stems):
            partial = f"{folder} lacks {', '.join(lacking)} of the four Fashion-MNIST files"
            break
    return next((folder for folder in candidates if has_idx_files(folder)), None), partial


def warn_partial_copy(partial: str | None, used: str) -> None:
    """Say on stderr that a local copy with missing files was passed over: never fall back in silence."""
    if partial:
        print(f"repro: warning: {partial}; using {used} instead", file=sys.stderr)


def _missing(data_dir: Path | None, partial: str | None) -> UserError:
    given = f" (looked in {data_dir})" if data_dir else ""
    lacks = f"; {partial}" if partial else ""
    return UserError(
        "Fashion-MNIST not found: (1) pass --data-dir or set REPRO_DATA_DIR to a folder holding the four IDX files"
        f"{given}; (2) apt-get install dataset-fashion-mnist (installs {DEBIAN_DIR}); or (3) go online so that "
        f"`datasets` can fetch {HUB_ID} from the Hugging Face hub{lacks}"
    )


@register_dataset("fashion_mnist", num_classes=10, train_images=60_000, test_images=10_000, channels=1, image_size=28)
def load_fashion_mnist(data_dir: Path | None = None, source: str = "auto", hub_id: str = HUB_ID,
                       revision: str | None = None) -> ImageDataset:
    """Load from, in order: ``data_dir``/``REPRO_DATA_DIR``, Debian's package folder, the hub.

    ``source`` forces one of ``local``, ``debian`` or ``hub``; ``auto`` tries them in that order.
    """
    data_dir = resolve_data_dir(data_dir)
    folder, partial = idx_folder(data_dir, source)
    if folder is not None:
        train, test = load_idx_dir(folder)
        warn_partial_copy(partial, str(folder))
        return ImageDataset("fashion_mnist", train, test, 10, MEAN, STD, str(folder), CLASSES)
    if source in ("auto", "hub"):
        try:
            train = load_hub_split(hub_id, "train", "image", "label", revision)
            test = load_hub_split(hub_id, "test", "image", "label", revision)
        except Exception as err:  # offline, missing, or gated: all mean "not available from the hub"
            if source == "hub":
                raise UserError(f"Fashion-MNIST: could not load {hub_id} through datasets: {err}") from None
            raise _missing(data_dir, partial) from None
        warn_partial_copy(partial, f"hub:{hub_id}")
        return ImageDataset("fashion_mnist", train, test, 10, MEAN, STD, f"hub:{hub_id}", CLASSES)
    raise _missing(data_dir, partial)
