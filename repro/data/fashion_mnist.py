"""Fashion-MNIST (Xiao et al. 2017): 60k/10k 28×28 grayscale images of 10 clothing classes."""

from __future__ import annotations

from pathlib import Path

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


def _load_idx_dir(directory: Path) -> tuple[TensorSplit, TensorSplit]:
    splits = []
    for images_stem, labels_stem in FILES.values():
        images = read_idx(find_idx_file(directory, images_stem))[:, None]
        labels = read_idx(find_idx_file(directory, labels_stem)).long()
        splits.append(TensorSplit(images.contiguous(), labels))
    return splits[0], splits[1]


def _missing(data_dir: Path | None) -> UserError:
    given = f" (looked in {data_dir})" if data_dir else ""
    return UserError(
        "Fashion-MNIST not found: (1) pass --data-dir or set REPRO_DATA_DIR to a folder holding the four IDX files"
        f"{given}; (2) apt-get install dataset-fashion-mnist (installs {DEBIAN_DIR}); or (3) go online so that "
        f"`datasets` can fetch {HUB_ID} from the Hugging Face hub"
    )


@register_dataset("fashion_mnist", num_classes=10)
def load_fashion_mnist(data_dir: Path | None = None, source: str = "auto", hub_id: str = HUB_ID,
                       revision: str | None = None) -> ImageDataset:
    """Load from, in order: ``data_dir``/``REPRO_DATA_DIR``, Debian's package folder, the hub.

    ``source`` forces one of ``local``, ``debian`` or ``hub``; ``auto`` tries them in that order.
    """
    data_dir = resolve_data_dir(data_dir)
    candidates = []
    if source in ("auto", "local") and data_dir is not None:
        candidates += [data_dir, data_dir / "fashion-mnist", data_dir / "fashion_mnist"]
    if source in ("auto", "debian"):
        candidates.append(DEBIAN_DIR)
    for directory in candidates:
        if has_idx_files(directory):
            train, test = _load_idx_dir(directory)
            return ImageDataset("fashion_mnist", train, test, 10, MEAN, STD, str(directory), CLASSES)
    if source in ("auto", "hub"):
        try:
            train = load_hub_split(hub_id, "train", "image", "label", revision)
            test = load_hub_split(hub_id, "test", "image", "label", revision)
        except Exception as err:  # offline, missing, or gated: all mean "not available from the hub"
            if source == "hub":
                raise UserError(f"Fashion-MNIST: could not load {hub_id} through datasets: {err}") from None
            raise _missing(data_dir) from None
        return ImageDataset("fashion_mnist", train, test, 10, MEAN, STD, f"hub:{hub_id}", CLASSES)
    raise _missing(data_dir)
