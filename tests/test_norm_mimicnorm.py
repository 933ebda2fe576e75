"""MimicNorm against its definition (paper_numbers.md §1f): weight mean, last BN, residual scalars, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from repro.errors import UserError
from repro.models import build_model
from repro.norms.mimicnorm import MimicNorm, project_weights

torch.set_num_threads(1)

MIN_FAN_IN = 50  # the official CIFAR filter: in*kh*kw > 50


def build(backbone: str, normalizer: str = "mimicnorm", **options) -> nn.Module:
    torch.manual_seed(0)
    return build_model(backbone, normalizer, num_classes=10, in_chans=1, small_input=True, **options)


def eligible(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] > MIN_FAN_IN


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def filter_means(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().mean(dim=(1, 2, 3))


def activation_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]


def sgd_steps(model: nn.Module, steps: int = 3) -> None:
    """A few optimizer steps on random data, with the normalizer's per-step hook, as the trainer does."""
    optimizer = torch.optim.SGD(model.normalizer.param_groups(model, 0.1, 5e-4), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,))).backward()
        optimizer.step()
        model.normalizer.after_step(model)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_050"])
def test_eligible_convs_have_zero_mean_filters_after_steps(backbone):
    model = build(backbone)
    sgd_steps(model)
    checked = [conv for conv in convs(model) if eligible(conv)]
    assert checked
    for conv in checked:
        assert filter_means(conv).abs().max() < 1e-6


def test_projection_leaves_ineligible_layers_untouched():
    """Depthwise convs, the 1-channel stem (fan-in 9), 1x1 convs with fan-in <= 50 and linear layers."""
    model = build("mobilenetv2_050")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # filters with clearly non-zero means
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    project_weights(model, MIN_FAN_IN)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    depthwise = [name for name, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    small = [name for name, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups == 1 and not eligible(m)]
    linear = [name for name, m in layers.items() if isinstance(m, nn.Linear)]
    assert depthwise and linear and "conv_stem" in small and len(small) > 1
    for name in depthwise + small + linear:
        assert torch.equal(layers[name].weight, before[f"{name}.weight"])
    for name in set(layers) - set(depthwise + small + linear):
        assert filter_means(layers[name]).abs().max() < 1e-6


def test_min_fan_in_option_reaches_the_stem():
    model = build("resnet18", min_fan_in=1)  # the official ImageNet filter: every groups == 1 conv
    assert filter_means(model.conv1).abs().max() < 1e-6
    assert filter_means(build("resnet18").conv1).abs().max() > 1e-3  # fan-in 9 <= 50: not projected


def _grouped_layers() -> nn.Sequential:
    """A 9x9 depthwise conv (fan-in 81), a 3x3 depthwise one (9), a conv of 8 groups (fan-in 8*9 = 72) and one
    of 16 groups (36), every filter with a clearly non-zero mean."""
    layers = nn.Sequential(nn.Conv2d(64, 64, 9, groups=64), nn.Conv2d(64, 64, 3, groups=64),
                           nn.Conv2d(64, 64, 3, groups=8), nn.Conv2d(64, 64, 3, groups=16))
    with torch.no_grad():
        for conv in layers:
            conv.weight.add_(1.0)
    return layers


@pytest.mark.parametrize(("dense_only", "projected"), [(False, [0, 2]), (True, [])])
def test_grouped_and_depthwise_convs_follow_the_official_cifar_filter_unless_dense_only(dense_only, projected):
    layers = _grouped_layers()
    official = [i for i, conv in enumerate(layers)  # Cifar100/main.py: in_channels*kh*kw/groups > 50
                if conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] / conv.groups > MIN_FAN_IN]
    assert official == [0, 2]
    project_weights(layers, MIN_FAN_IN, dense_only=dense_only)
    centred = [i for i, conv in enumerate(layers) if filter_means(conv).abs().max() < 1e-6]
    assert centred == projected


def test_dense_only_option_reaches_the_normalizer():
    model = nn.Sequential(_grouped_layers())
    assert MimicNorm(dense_only=True).dense_only and not MimicNorm().dense_only
    MimicNorm().after_step(model)
    assert filter_means(model[0][2]).abs().max() < 1e-6
    model = nn.Sequential(_grouped_layers())
    MimicNorm(dense_only=True).after_step(model)
    assert filter_means(model[0][2]).abs().max() > 0.5


@pytest.mark.parametrize("backbone", ["mobilenetv2_050", "mobilenetv2_100"])
def test_shipped_backbones_have_no_grouped_conv_the_two_rules_disagree_on(backbone):
    """Why the default could follow the official filter without changing any shipped suite's numbers."""
    grouped = [conv for conv in convs(build(backbone, "bn")) if conv.groups > 1]
    assert grouped and all(conv.weight[0].numel() <= MIN_FAN_IN for conv in grouped)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenetv2_050"])
def test_only_the_last_batchnorm_remains(backbone):
    bn_model = build(backbone, "bn")
    bn_layers = [m for m in bn_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_layers) == len(convs(bn_model))  # in these families every conv is followed by a BN
    model = build(backbone)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)]
    assert len(norms) == 1
    last_bn = norms[0]
    assert type(last_bn) is nn.BatchNorm1d and last_bn.num_features == 10 and not last_bn.affine
    for conv in convs(model):  # each conv lost its BN and got a zero-initialised bias
        assert conv.bias is not None and not conv.bias.any()
    assert activation_types(model) == activation_types(bn_model)  # fused norm-act layers kept their activation


def test_weight_mean_only_has_no_normalization_but_keeps_projection_and_scalars():
    """``last_bn=False``: the Table 2 "Weight Mean" ablation is MimicNorm without the BN on the logits."""
    model = build("resnet18", last_bn=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.get_classifier(), nn.Linear)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 8
    assert model.layer1[0].bn2.scale.item() == pytest.approx(1.2**2)  # the residual scalar of the first block
    sgd_steps(model)
    for conv in convs(model):
        if eligible(conv):
            assert filter_means(conv).abs().max() < 1e-6


def test_logits_are_batch_normalized_in_train_mode():
    model = build("resnet18")
    classifier = model.get_classifier()
    logits_before_bn = []
    classifier.classifier.register_forward_hook(lambda module, inputs, output: logits_before_bn.append(output))
    model.train()
    logits = model(torch.randn(32, 1, 28, 28)).detach()
    raw_variance = logits_before_bn[0].detach().var(0, unbiased=False)
    assert logits.mean(0).abs().max() < 1e-5
    # BatchNorm1d's definition: (z - mean) / sqrt(var + eps), so the batch variance is var / (var + eps)
    expected = raw_variance / (raw_variance + classifier.last_bn.eps)
    torch.testing.assert_close(logits.var(0, unbiased=False), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("backbone", "block_type", "layers"), [("resnet18", BasicBlock, 2),
                                                                ("resnet50", Bottleneck, 3)])
@pytest.mark.parametrize("rule", ["official", "paper"])
def test_residual_scalar_init(backbone, block_type, layers, rule):
    model = build(backbone, residual_scale_init=rule)
    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    assert len(blocks) == {"resnet18": 8, "resnet50": 16}[backbone]
    for index, block in enumerate(blocks, start=1):
        end_of_branch = block.bn2 if block_type is BasicBlock else block.bn3
        expected = 1.2**layers / index if rule == "official" else 1 / math.sqrt(index)
        assert end_of_branch.scale.item() == pytest.approx(expected, rel=1e-6)
        assert end_of_branch.scale.requires_grad


def test_light_backbone_scalars_count_only_blocks_with_a_shortcut():
    """Official MobileNetV2 rule: 1.2**m / l on blocks with a shortcut, 1.2**m on the others (m = 1x1 convs)."""
    model = build("mobilenetv2_050")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual | DepthwiseSeparableConv)]
    assert any(block.has_skip for block in blocks) and not all(block.has_skip for block in blocks)
    index = 0
    for block in blocks:
        end_of_branch = block.bn3 if isinstance(block, InvertedResidual) else block.bn2
        pointwise = sum(1 for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)
        index += block.has_skip
        expected = 1.2**pointwise / (index if block.has_skip else 1)
        assert end_of_branch[0].scale.item() == pytest.approx(expected, rel=1e-6)  # [0]: before the fused act


@pytest.mark.parametrize("rule", ["official", "paper"])
def test_init_std_of_a_large_conv(rule):
    """resnet50 layer4 3x3 conv, 512*512*9 weights: std within 2% of the rule's formula."""
    conv = build("resnet50", init=rule).layer4[1].conv2
    n = conv.in_channels * 9
    expected = math.sqrt(2 / n) if rule == "official" else math.sqrt(2 / ((n - 1) * (1 - 1 / math.pi)))
    expected *= math.sqrt((n - 1) / n)  # the weight mean removes one of the n degrees of freedom per filter
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_straight_network_gets_the_vgg_init_and_no_scalars():
    """LCNet's blocks have no shortcut: the official straight-network init N(0, 2.8/fan_in), no scalars."""
    model = build("lcnet_050")
    assert not any(hasattr(m, "scale") for m in model.modules())
    conv = max((c for c in convs(model) if eligible(c)), key=lambda c: c.weight.numel())
    n = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.8 / n * (n - 1) / n), rel=0.02)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="min_fan_in"):
        build("resnet18", min_fan_in=0)
    with pytest.raises(UserError, match="init"):
        build("resnet18", init="xavier")
    with pytest.raises(UserError, match="bad options"):
        build("resnet18", momentum=0.1)
