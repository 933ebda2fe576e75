"""How far an untrained network's first step reaches: logit std, loss and gradient norm at initialization.

One batch of 512 Fashion-MNIST training images (normalized as the trainer does, label smoothing 0.1), ResNet-20
per normalizer and seed. Without normalization the residual branches are not scaled down at init, so the first
warm-up steps of a recipe tuned for BatchNorm take a far larger step: the evidence behind
benchmarks/experiments/none-threads.yaml.

    python benchmarks/init_scale.py --normalizers bn none mimicnorm fixup --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from repro.data import load_dataset
from repro.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normalizers", nargs="+", default=["bn", "none", "mimicnorm", "fixup"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("fashion_mnist")
    images = data.train.images[: args.images].float().div(255)
    images = (images - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    labels = data.train.labels[: args.images]
    print("| normalizer | seed | logit std | loss | gradient norm |\n|---|---|---|---|---|")
    for normalizer in args.normalizers:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_model("resnet20", normalizer, num_classes=10, in_chans=1, small_input=True).train()
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            loss.backward()
            norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
            print(f"| {normalizer} | {seed} | {logits.std():.3f} | {loss.item():.3f} | {norm:.3f} |")


if __name__ == "__main__":
    main()
