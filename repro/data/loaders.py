"""Batch iterators that end in normalized float tensors on the training device.

``DeviceLoader`` keeps a whole uint8 split on the device and does shuffling, random crop with padding and
flips as batched tensor ops (no per-image Python), as airbench does. ``FolderLoader`` decodes image files
in DataLoader workers for datasets that do not fit in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from repro.data.base import FolderSplit, Split, TensorSplit


class PixelNormalizer:
    """uint8 pixels -> (x - mean) / std in float32, optionally channels-last; shared with test-time adaptation."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, channels_last: bool):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def random_crop(padded: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Crop every image of a padded batch at its own random offset, with one gather."""
    batch, _, padded_h, padded_w = padded.shape
    height, width = size
    dy = torch.randint(0, padded_h - height + 1, (batch, 1), device=padded.device, generator=generator)
    dx = torch.randint(0, padded_w - width + 1, (batch, 1), device=padded.device, generator=generator)
    rows = (dy + torch.arange(height, device=padded.device))[:, :, None]
    cols = (dx + torch.arange(width, device=padded.device))[:, None, :]
    batch_index = torch.arange(batch, device=padded.device)[:, None, None]
    return padded[batch_index, :, rows, cols].permute(0, 3, 1, 2)


class DeviceLoader:
    """Iterate over a ``TensorSplit`` held on ``device``; training order and augmentation come from ``seed``."""

    def __init__(self, split: TensorSplit, batch_size: int, *, device: torch.device, mean: tuple[float, ...],
                 std: tuple[float, ...], train: bool = False, crop_padding: int = 0, flip: bool = False, seed: int = 0,
                 drop_last: bool | None = None, channels_last: bool = False) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.crop_padding = crop_padding if train else 0
        self.flip = flip and train
        self.drop_last = train if drop_last is None else drop_last
        self.normalize = PixelNormalizer(mean, std, device, channels_last)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        if self.crop_padding:
            p = self.crop_padding
            self.padded = torch.nn.functional.pad(self.images, (p, p, p, p))

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The generator state that decides the next epochs' order and augmentation (for resuming)."""
        return {"augment": self.generator.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["augment"])

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        device = self.labels.device
        if self.train:
            order = torch.randperm(n, device=device, generator=self.generator)
        else:
            order = torch.arange(n, device=device)
        for step in range(len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            if self.crop_padding:
                images = random_crop(self.padded[index], self.images.shape[-2:], self.generator)
            else:
                images = self.images[index]
            if self.flip:
                images = random_flip(images, self.generator)
            yield self.normalize(images), self.labels[index]


class _DecodedFolder(Dataset):
    def __init__(self, split: FolderSplit, train: bool):
        from torchvision.transforms import v2

        size = split.image_size
        if train:
            steps = [v2.RandomResizedCrop(size, antialias=True)]
        else:
            steps = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
        self.split = split
        self.transform = v2.Compose([v2.PILToTensor(), *steps])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.split.files[index]) as image:
            return self.transform(image.convert("RGB")), self.split.labels[index]


def decode_folder(split: FolderSplit, workers: int = 0) -> torch.Tensor:
    """The whole split decoded as for evaluation (resize, center crop): uint8 N×C×H×W in file order."""
    loader = DataLoader(_DecodedFolder(split, train=False), batch_size=64, num_workers=workers)
    return torch.cat([images for images, _ in loader])


class FolderLoader:
    """Decode a ``FolderSplit`` in workers (RandomResizedCrop for training, resize + center crop for eval)."""

    def __init__(self, split: FolderSplit, batch_size: int, *, device: torch.device, mean: tuple[float, ...],
                 std: tuple[float, ...], train: bool = False, flip: bool = False, seed: int = 0,
                 drop_last: bool | None = None, channels_last: bool = False, workers: int | None = None,
                 crop_padding: int = 0) -> None:
        del crop_padding  # random-resized crops already play that role for full-size images
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.loader = DataLoader(
            _DecodedFolder(split, train), batch_size=batch_size, shuffle=train, num_workers=workers,
            drop_last=train if drop_last is None else drop_last, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
        )
        self.device = device
        self.flip = flip and train
        self.normalize = PixelNormalizer(mean, std, device, channels_last)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Order and flips resume exactly; the workers' random crops do not (they are seeded when started)."""
        return {"augment": self.generator.get_state(), "order": self.loader.generator.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["augment"])
        self.loader.generator.set_state(state["order"])

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            if self.flip:
                images = random_flip(images, self.generator)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)


def make_loader(split: Split, batch_size: int, **kwargs) -> DeviceLoader | FolderLoader:
    if isinstance(split, TensorSplit):
        kwargs.pop("workers", None)
        return DeviceLoader(split, batch_size, **kwargs)
    return FolderLoader(split, batch_size, **kwargs)
