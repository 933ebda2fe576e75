"""Loading image datasets through Hugging Face ``datasets``: a hub id, or a local folder in the hub's layout."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from repro.data.base import TensorSplit


def load_hub_split(path: str, split: str, image_column: str, label_column: str, revision: str | None = None
                   ) -> TensorSplit:
    """One split as uint8 N×C×H×W tensors.

    ``path`` is a hub id (``zalando-datasets/fashion_mnist``) or a local directory of parquet files laid out
    as on the hub; both go through the same ``datasets.load_dataset`` call, which is how the tests exercise
    this code without a network. Reaching the hub is announced on stderr: it is the one step that may download.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("loading from the Hugging Face hub needs the `datasets` package: "
                          "pip install 'datasets' (or pass --data-dir to a local copy)") from None

    if not Path(path).exists():
        pinned = f" at revision {revision}" if revision else ""
        print(f"repro: loading {path} ({split}){pinned} from the Hugging Face hub", file=sys.stderr)

    dataset = datasets.load_dataset(path, split=split, revision=revision)
    dataset = dataset.select_columns([image_column, label_column]).with_format("torch")
    images = dataset[:][image_column]
    if isinstance(images, list):
        images = torch.stack(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return TensorSplit(images.to(torch.uint8).contiguous(), dataset[:][label_column].to(torch.int64))
