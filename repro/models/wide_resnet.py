"""WRN-28-10 (Zagoruyko & Komodakis 2016) as a timm model, ``wrn28_10``: timm has no CIFAR wide ResNet.

It is the model of the TENT repository's CIFAR-10-C table (RobustBench's "Standard"). Module names follow the
widely copied WideResNet code (``block1.layer.0.bn1``, ``convShortcut`` ...) that RobustBench's model uses too;
its checkpoint takes [0, 1] pixels (no input normalization), which our loaders do not give, so the suites train
the model instead of loading that checkpoint.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class WideBasic(nn.Module):
    """Pre-activation basic block; the shortcut takes the activated input when the shape changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width for 32-pixel inputs: 3 stages of (depth − 4) / 6 blocks, widths 16k, 32k, 64k."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


default_cfgs = generate_default_cfgs({
    "wrn28_10": {"num_classes": 10, "input_size": (3, 32, 32), "first_conv": "conv1", "classifier": "fc",
                 "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
})


@register_model
def wrn28_10(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """WRN-28-10 (36.5 M parameters), RobustBench's CIFAR-10 "Standard" architecture."""
    return build_model_with_cfg(WideResNet, "wrn28_10", pretrained, depth=28, width=10, **kwargs)
