"""The CIFAR ResNets of He et al. 2016 (§4.2) as timm models: ``resnet20``, ``resnet32``, ``resnet56``, ``resnet110``.

A 3x3 stem conv with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64 channels at
strides 1, 2, 2 (depth ``6n + 2``), global average pooling and the classifier: the networks of Fixup's CIFAR-10
table and of MimicNorm's CIFAR experiments, small enough to train on a CPU.

Each is a timm ``ResNet`` made of timm ``BasicBlock``s, so every normalizer that converts a timm ResNet (Fixup's
blocks, MimicNorm's branch scalars, CBN's conv/BN pairs, GN, BRN, fixed-point BN) applies unchanged. The
shortcut that changes shape is **option B** (a 1x1 strided conv and a BN, timm's ``downsample_conv``), as in
MimicNorm's CIFAR code; Fixup's CIFAR code and He et al.'s count use option A (subsampling and zero padding,
no parameters). Option B adds 2,560 conv weights and a BN per projection, about 1% of ResNet-20, so the
paper's parameter counts (0.27 M, 0.46 M, 0.85 M, 1.7 M, option A) hold without the projections.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet, make_blocks
from torch import nn

STAGE_CHANNELS = (16, 32, 64)


class CifarResNet(ResNet):
    """timm's ResNet with the CIFAR stem (3x3 stride-1 conv, no max-pool) and three 16-32-64 stages."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_chans: int = 3, **kwargs: object) -> None:
        layers = (blocks_per_stage,) * len(STAGE_CHANNELS)
        super().__init__(BasicBlock, layers, num_classes=num_classes, in_chans=in_chans, channels=STAGE_CHANNELS,
                         **kwargs)
        # timm's stem is always 64 wide: rebuild it, and the stages that follow it, at 16 channels
        stem = STAGE_CHANNELS[0]
        self.conv1 = nn.Conv2d(in_chans, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.Identity()
        stages, stage_info = make_blocks((BasicBlock,) * len(STAGE_CHANNELS), STAGE_CHANNELS, layers, stem)
        for name, stage in stages:
            setattr(self, name, stage)
        self.layer4 = nn.Identity()  # timm's forward runs layer1..layer4
        self.feature_info = [dict(num_chs=stem, reduction=1, module="act1"), *stage_info]
        self.init_weights(zero_init_last=True)


_CFG = {"num_classes": 10, "input_size": (3, 32, 32), "first_conv": "conv1", "classifier": "fc",
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
default_cfgs = generate_default_cfgs({f"resnet{depth}": dict(_CFG) for depth in (20, 32, 56, 110)})


def _cifar_resnet(depth: int, pretrained: bool, **kwargs: object) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, f"resnet{depth}", pretrained, blocks_per_stage=(depth - 2) // 6,
                                feature_cfg={"flatten_sequential": True}, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27 M parameters)."""
    return _cifar_resnet(20, pretrained, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, 0.46 M parameters)."""
    return _cifar_resnet(32, pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.85 M parameters)."""
    return _cifar_resnet(56, pretrained, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet-110 (18 blocks per stage, 1.7 M parameters)."""
    return _cifar_resnet(110, pretrained, **kwargs)
