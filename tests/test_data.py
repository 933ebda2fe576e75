"""Dataset loaders (every source and layout, on files the tests write) and the on-device loader."""

from pathlib import Path

import pytest
import torch

from repro.data import DATASETS, DeviceLoader, FolderSplit, TensorSplit, load_dataset
from repro.data import fashion_mnist as fm
from repro.data.base import DatasetShape
from repro.data.generated import class_images, write_cifar, write_fashion_mnist, write_hub_parquet, write_image_folder
from repro.data.idx import read_idx, write_idx
from repro.errors import UserError


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    data = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, data)
    assert torch.equal(read_idx(path), data)


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, train=30, test=20, gz=False)
    data = load_dataset("fashion_mnist", data_dir=tmp_path, source="local")
    assert data.train.images.shape == (30, 1, 28, 28) and data.test.images.shape == (20, 1, 28, 28)
    assert data.train.images.dtype == torch.uint8 and data.source == str(tmp_path)
    expected = read_idx(tmp_path / "train-images-idx3-ubyte")
    assert torch.equal(data.train.images[:, 0], expected)


def test_fashion_mnist_env_var_is_the_first_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path / "fashion-mnist", train=10, test=10)
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path))
    assert load_dataset("fashion_mnist").source == str(tmp_path / "fashion-mnist")


@pytest.mark.skipif(not fm.has_idx_files(fm.DEBIAN_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package() -> None:
    data = load_dataset("fashion_mnist", source="debian")
    assert (len(data.train), len(data.test)) == (60_000, 10_000)
    assert sorted(data.train.labels.unique().tolist()) == list(range(10))
    # The normalization constants are the statistics of the training images.
    pixels = data.train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(fm.MEAN[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(fm.STD[0], abs=1e-3)


def test_fashion_mnist_through_hub_code_path(tmp_path: Path) -> None:
    """The hub loader is `datasets.load_dataset(path)`; a local folder in the hub's parquet layout exercises it."""
    write_hub_parquet(tmp_path, "image", "label", channels=1, size=28, num_classes=10, train=20, test=10)
    data = load_dataset("fashion_mnist", source="hub", hub_id=str(tmp_path))
    images, labels = class_images(10, 2, 1, 28, seed=0)
    assert data.train.images.shape == (20, 1, 28, 28)
    assert torch.equal(data.train.images, torch.from_numpy(images[:20]))
    assert data.train.labels.tolist() == labels[:20].tolist()


def test_fashion_mnist_missing_names_all_three_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.delenv("REPRO_DATA_DIR", raising=False)
    with pytest.raises(UserError) as err:
        load_dataset("fashion_mnist", data_dir=tmp_path, hub_id=str(tmp_path / "no-such-hub-copy"))
    message = str(err.value)
    assert "--data-dir" in message and "dataset-fashion-mnist" in message and "hub" in message


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_release_layout(tmp_path: Path, num_classes: int) -> None:
    write_cifar(tmp_path, num_classes, train=250, test=50)
    data = load_dataset(f"cifar{num_classes}", data_dir=tmp_path, source="local")
    assert data.train.images.shape == (250, 3, 32, 32) and len(data.test) == 50
    assert data.num_classes == num_classes
    images, labels = class_images(num_classes, -(-250 // num_classes), 3, 32, seed=0)
    assert torch.equal(data.train.images, torch.from_numpy(images[:250]))
    assert data.train.labels.tolist() == labels[:250].tolist()


def test_cifar_hub_layout(tmp_path: Path) -> None:
    write_hub_parquet(tmp_path, "img", "label", channels=3, size=32, num_classes=10, train=20, test=10)
    data = load_dataset("cifar10", source="hub", hub_id=str(tmp_path))
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.images.shape == (10, 3, 32, 32)


def test_imagenet_folder_layout(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imagenet", num_classes=3, per_class=2, size=40)
    data = load_dataset("imagenet", data_dir=tmp_path)
    assert isinstance(data.train, FolderSplit) and len(data.train) == 6 and data.num_classes == 3
    assert data.class_names == [f"n{i:08d}" for i in range(3)]
    loader = DeviceLoader if False else None  # noqa: F841  (folder splits go through FolderLoader)
    from repro.data import make_loader

    batches = list(make_loader(data.test, 4, device=torch.device("cpu"), mean=data.mean, std=data.std, workers=0))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 224, 224), (2, 3, 224, 224)]


def test_imagenet_missing_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ImageNet not found"):
        load_dataset("imagenet", data_dir=tmp_path)


def test_registry_entries_carry_the_full_splits_and_image_shapes() -> None:
    """The time estimates read these instead of loading data (repro.tasks.workload)."""
    assert {name: DATASETS.get(name).shape for name in DATASETS} == {
        "cifar10": DatasetShape(50_000, 10_000, 3, 32, 10),
        "cifar100": DatasetShape(50_000, 10_000, 3, 32, 100),
        "fashion_mnist": DatasetShape(60_000, 10_000, 1, 28, 10),
        "imagenet": DatasetShape(1_281_167, 50_000, 3, 224, 1000),
    }
    for name in ("cifar10", "cifar100", "fashion_mnist"):  # the generated copies have the real image shape
        shape, data = DATASETS.get(name).shape, load_dataset(name, generated=True)
        assert data.train.images.shape[1:] == (shape.channels, shape.image_size, shape.image_size)
        assert data.num_classes == shape.num_classes


def test_subset_is_fixed_and_shared() -> None:
    split = TensorSplit(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100))
    first, second = split.subset(10), split.subset(10)
    assert torch.equal(first.labels, second.labels) and len(first) == 10
    assert torch.equal(first.images.view(-1).long(), first.labels)


def test_device_loader_crop_and_flip_are_shifts_of_the_image() -> None:
    """Every augmented image equals the padded original cut at some offset, possibly mirrored."""
    images = torch.randint(1, 256, (16, 1, 6, 6), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(16))
    loader = DeviceLoader(split, 16, device=torch.device("cpu"), mean=(0.0,), std=(1 / 255,), train=True,
                          crop_padding=2, flip=True, seed=3)
    (batch, labels), = list(loader)
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2))
    for x, label in zip(batch, labels, strict=True):
        source = padded[label]
        candidates = [source[:, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(x, c) for c in candidates)


def test_device_loader_order_depends_on_seed_only() -> None:
    split = TensorSplit(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50))
    kwargs = {"device": torch.device("cpu"), "mean": (0.0,), "std": (1.0,), "train": True}
    order = [torch.cat([y for _, y in DeviceLoader(split, 8, seed=s, **kwargs)]) for s in (1, 1, 2)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert len(order[0]) == 48  # drop_last in training: 6 full batches
