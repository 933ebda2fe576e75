"""Why does Fixup not learn on Fashion-MNIST at BatchNorm's recipe? One short training per hypothesis.

Each variant trains with repro's own trainer on 12,800 training images (100 steps of 128 per epoch) for 3 epochs:
1 epoch of linear warm-up to the peak learning rate, then the peak rate held (the BN recipe's first epochs, where
the earlier CPU runs fell back to chance), and reports the train loss and test top-1 (2,000 test images) after
every epoch. Variants:

* ``bn``: the BN model at the recipe (the reference);
* ``fixup``: Fixup at BN's recipe (lr 0.1, Nesterov, wd 5e-4, label smoothing 0.1);
* ``fixup_lr0.01``: the recipe's learning rate divided by 10 (is it the recipe?);
* ``fixup_mixup``: Fixup's own CIFAR recipe adds mixup (alpha 1);
* ``fixup_stem_fan_in``: the 1-channel 3x3 stem re-initialised with He fan-in instead of fan-out: the fan-out
  rule gives a 1-channel stem an output 8x (std) smaller than its input's (is it the 1-channel stem?);
* ``fixup_3ch``: the same images given as 3 identical channels (a CIFAR-like stem fan-in of 27).

Usage: ``python benchmarks/fixup_fmnist.py resnet18 [variant ...]``; ``TRAIN_IMAGES=6400`` shortens the epochs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch
from torch import nn

from repro.data import ImageDataset, TensorSplit, load_dataset
from repro.models import build_model
from repro.train import TrainConfig, seed_everything, train_and_evaluate

RECIPE = {"epochs": 3, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
          "schedule": "constant", "warmup_epochs": 1, "label_smoothing": 0.1, "crop_padding": 2, "flip": True}
VARIANTS = {
    "bn": ("bn", {}, False, False),
    "fixup": ("fixup", {}, False, False),
    "fixup_lr0.01": ("fixup", {"lr": 0.01}, False, False),
    "fixup_mixup": ("fixup", {"mixup_alpha": 1.0}, False, False),
    "fixup_stem_fan_in": ("fixup", {}, True, False),
    "fixup_3ch": ("fixup", {}, False, True),
}


def three_channels(data: ImageDataset) -> ImageDataset:
    def widen(split: TensorSplit) -> TensorSplit:
        return TensorSplit(split.images.expand(-1, 3, -1, -1).contiguous(), split.labels)

    return dataclasses.replace(data, train=widen(data.train), test=widen(data.test), mean=data.mean * 3,
                               std=data.std * 3)


def main(backbone: str, names: list[str]) -> None:
    data = load_dataset("fashion_mnist").subset(int(os.environ.get("TRAIN_IMAGES", 12800)), 2000)
    for name in names:
        normalizer, overrides, stem_fan_in, rgb = VARIANTS[name]
        variant_data = three_channels(data) if rgb else data
        seed_everything(0)
        model = build_model(backbone, normalizer, num_classes=10, in_chans=variant_data.in_chans, small_input=True)
        if stem_fan_in:
            with torch.no_grad():
                nn.init.kaiming_normal_(model.conv1.weight, mode="fan_in", nonlinearity="relu")
        start = time.perf_counter()
        result = train_and_evaluate(model, variant_data, TrainConfig(**{**RECIPE, **overrides}),
                                    device=torch.device("cpu"), seed=0, progress=False)
        curve = " | ".join(f"ep{c['epoch']}: train loss {c['train_loss']:.3f} top1 {c['test_top1']:.1f}"
                           for c in result.curve)
        print(f"{backbone} {name:<18} {result.status:<8} {curve}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(VARIANTS))
