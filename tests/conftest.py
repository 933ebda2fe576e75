"""Shared fixtures. Tests run on CPU with one thread: the machine's cores are shared."""

import pytest
import torch

from repro.data import ImageDataset, load_dataset
from repro.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fashion_mnist() -> ImageDataset:
    """The real Fashion-MNIST from a local copy (REPRO_DATA_DIR) or Debian's package; never the hub."""
    errors = []
    for source in ("local", "debian"):
        try:
            return load_dataset("fashion_mnist", source=source)
        except UserError as err:
            errors.append(str(err))
    pytest.skip(f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): {errors[-1]}")
