"""Released-benchmark loaders on small files written here in the release layouts."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repro.adapt import create_method
from repro.adapt.evaluate import evaluate_corruptions
from repro.data.corrupted import cifar_c_view, imagenet_c_view
from repro.errors import UserError

torch.set_num_threads(1)

PER_SEVERITY = 4  # the release has 10,000


def write_cifar_c(root, corruptions=("gaussian_noise", "fog"), labels_rows=5 * PER_SEVERITY):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in corruptions:
        arrays[name] = rng.integers(0, 256, size=(5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{name}.npy", arrays[name])
    labels = rng.integers(0, 10, size=labels_rows).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    return arrays, labels


def test_cifar_c_view_reads_the_rows_of_one_severity(tmp_path):
    arrays, labels = write_cifar_c(tmp_path)
    view = cifar_c_view(tmp_path)
    for severity in (1, 3, 5):
        images, targets = view("fog", severity)
        rows = slice((severity - 1) * PER_SEVERITY, severity * PER_SEVERITY)
        assert images.dtype == torch.uint8 and images.shape == (PER_SEVERITY, 3, 32, 32)
        assert torch.equal(images, torch.from_numpy(arrays["fog"][rows]).permute(0, 3, 1, 2))
        assert torch.equal(targets, torch.from_numpy(labels[rows].astype(np.int64)))


def test_cifar_c_view_accepts_one_severity_of_labels(tmp_path):
    _, labels = write_cifar_c(tmp_path, labels_rows=PER_SEVERITY)
    _, targets = cifar_c_view(tmp_path)("gaussian_noise", 4)
    assert torch.equal(targets, torch.from_numpy(labels.astype(np.int64)))


def test_cifar_c_view_errors(tmp_path):
    with pytest.raises(UserError, match=r"labels\.npy"):
        cifar_c_view(tmp_path)
    write_cifar_c(tmp_path, labels_rows=7)
    view = cifar_c_view(tmp_path)
    with pytest.raises(UserError, match="available: fog, gaussian_noise"):
        view("snow", 1)
    with pytest.raises(UserError, match="severity"):
        view("fog", 6)
    with pytest.raises(UserError, match="7 labels"):
        view("fog", 1)


def write_imagenet_c(root, sizes=(256, 256, 224, 256)):
    """Two classes with two PNG images each (lossless, so pixels can be compared)."""
    rng = np.random.default_rng(1)
    pixels = {}
    for i, size in enumerate(sizes):
        folder = root / "fog" / "2" / ("n01" if i < 2 else "n02")
        folder.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i}.png")
        pixels[(folder.name, f"img{i}.png")] = array
    return [pixels[key] for key in sorted(pixels)]


def test_imagenet_c_view_center_crops_224(tmp_path):
    arrays = write_imagenet_c(tmp_path)
    images, labels = imagenet_c_view(tmp_path)("fog", 2)
    assert len(images) == 4 and labels.tolist() == [0, 0, 1, 1]
    for image, array in zip(images, arrays, strict=True):
        top = (array.shape[0] - 224) // 2  # torchvision CenterCrop: round((256 - 224) / 2) = 16
        expected = torch.from_numpy(array[top : top + 224, top : top + 224]).permute(2, 0, 1)
        assert image.dtype == torch.uint8 and torch.equal(image, expected)


def test_imagenet_c_view_labels_and_errors(tmp_path):
    write_imagenet_c(tmp_path)
    _, labels = imagenet_c_view(tmp_path, classes=["n00", "n01", "n02"])("fog", 2)
    assert labels.tolist() == [1, 1, 2, 2]
    with pytest.raises(UserError, match="not in the given classes"):
        imagenet_c_view(tmp_path, classes=["n01"])("fog", 2)
    with pytest.raises(UserError, match="corruptions found: fog"):
        imagenet_c_view(tmp_path)("fog", 3)
    with pytest.raises(UserError, match="does not exist"):
        imagenet_c_view(tmp_path / "missing")


def test_evaluation_on_both_layouts(tmp_path):
    write_imagenet_c(tmp_path / "imagenet-c", sizes=(40, 40, 32, 40))
    write_cifar_c(tmp_path / "cifar-c")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for view, corruption, severity in [(imagenet_c_view(tmp_path / "imagenet-c", crop_size=32), "fog", 2),
                                       (cifar_c_view(tmp_path / "cifar-c"), "gaussian_noise", 3)]:
        (row,) = evaluate_corruptions(create_method("source", model), view, [corruption], [severity], mean=mean,
                                      std=std, batch_size=3)
        images, labels = view(corruption, severity)
        stacked = torch.stack([images[i] for i in range(len(images))])
        with torch.no_grad():
            predictions = model((stacked.float() / 255 - 0.5) / 0.25).argmax(1)
        assert row["n"] == 4
        assert row["error"] == pytest.approx(100 * (predictions != labels).sum().item() / 4)
