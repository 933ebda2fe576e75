"""CIFAR ResNets (He et al. 2016, §4.2) registered with timm, and every normalizer applied to them."""

import pytest
import timm
import torch
from torch import nn

from repro.models import build_model
from repro.norms.batch_renorm import BatchRenorm2d
from repro.norms.cbn import CrossIterationBatchNorm2d
from repro.norms.fixup import FixupBlock
from repro.norms.mimicnorm import BranchScale, ClassifierWithLastBN
from repro.norms.qbn import convert_to_qbn


def option_b_parameter_count(depth: int, in_chans: int = 3, num_classes: int = 10) -> int:
    """Counted from the architecture's definition: 3x3 convs without bias, BN (weight, bias) after each conv,
    a 1x1 conv + BN on the two shortcuts that change shape, a linear classifier."""
    blocks = (depth - 2) // 6
    count = in_chans * 16 * 9 + 2 * 16  # stem conv + BN
    inplanes = 16
    for planes in (16, 32, 64):
        for index in range(blocks):
            count += inplanes * planes * 9 + planes * planes * 9 + 4 * planes
            if index == 0 and inplanes != planes:
                count += inplanes * planes + 2 * planes
            inplanes = planes
    return count + 64 * num_classes + num_classes


@pytest.mark.parametrize(("depth", "paper_millions"), [(20, 0.27), (32, 0.46), (56, 0.85), (110, 1.7)])
def test_parameter_counts_match_the_paper(depth, paper_millions):
    assert timm.is_model(f"resnet{depth}")
    model = build_model(f"resnet{depth}", "bn", num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert count == option_b_parameter_count(depth)
    # the paper counts option A (parameter-free shortcuts): leave out the two projections, 1x1 conv and BN each
    projections = sum(p.numel() for name, p in model.named_parameters() if ".downsample." in name)
    assert projections == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    digits = 2 if paper_millions < 1 else 1  # the paper gives two significant digits
    assert round((count - projections) / 1e6, digits) == paper_millions


def test_layout_is_the_cifar_one():
    model = build_model("resnet20", "bn", num_classes=10, in_chans=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 16
    assert isinstance(model.maxpool, nn.Identity)
    assert [len(model.get_submodule(f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    features = model.forward_features(torch.zeros(2, 1, 28, 28))
    assert features.shape == (2, 64, 7, 7)  # strides 1, 2, 2 on 28 px


def _train_step(model: nn.Module) -> torch.Tensor:
    model.train()
    logits = model(torch.randn(8, 1, 28, 28))
    nn.functional.cross_entropy(logits, torch.arange(8) % 10).backward()
    return logits


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# 9 blocks x 2 convs with a BN each, the stem's BN, and the BN of the two projection shortcuts: 21 BNs
BATCHNORMS = 21


@pytest.mark.parametrize(("normalizer", "options", "check"), [
    ("gn", {"groups": 8}, lambda m: _count(m, nn.GroupNorm) == BATCHNORMS and _count(m, nn.BatchNorm2d) == 0),
    ("gn", {"group_size": 8}, lambda m: next(g for g in m.modules() if isinstance(g, nn.GroupNorm)).num_groups == 2),
    ("none", {}, lambda m: _count(m, nn.BatchNorm2d) == 0),
    ("brn", {}, lambda m: _count(m, BatchRenorm2d) == BATCHNORMS),
    ("cbn", {}, lambda m: _count(m, CrossIterationBatchNorm2d) == BATCHNORMS),
    ("mimicnorm", {}, lambda m: _count(m, BranchScale) == 9 and _count(m, ClassifierWithLastBN) == 1
     and _count(m, nn.BatchNorm2d) == 0),
    ("fixup", {}, lambda m: _count(m, FixupBlock) == 9 and _count(m, nn.BatchNorm2d) == 0),
])
def test_every_normalizer_applies(normalizer, options, check):
    model = build_model("resnet20", normalizer, num_classes=10, in_chans=1, **options)
    assert check(model)
    logits = _train_step(model)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fixup_starts_at_zero_output_and_mimicnorm_scalars_follow_the_official_rule():
    fixup = build_model("resnet20", "fixup", num_classes=10, in_chans=1)
    assert fixup(torch.randn(2, 1, 28, 28)).abs().max() == 0  # classifier starts at 0
    mimic = build_model("resnet20", "mimicnorm", num_classes=10, in_chans=1)
    scales = [m.scale.item() for m in mimic.modules() if isinstance(m, BranchScale)]
    assert scales == pytest.approx([1.2**2 / index for index in range(1, 10)])  # 1.2**m / l, m = 2 convs


def test_fixed_point_bn_converts_a_trained_resnet20():
    model = build_model("resnet20", "bn", num_classes=10, in_chans=1)
    _train_step(model)
    model.eval()
    images = torch.randn(16, 1, 28, 28)
    quantized = convert_to_qbn(model, [images], bits=16)
    assert sum(type(m).__name__ == "QuantizedBatchNorm2d" for m in quantized.modules()) == BATCHNORMS
    assert (quantized(images).argmax(1) == model(images).argmax(1)).float().mean() >= 0.9
