"""Fixup against the paper's recipe and the official code's placement (paper_numbers.md §2b)."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from repro.errors import UserError
from repro.models import build_model
from repro.norms.fixup import FixupBlock

torch.set_num_threads(1)

BACKBONES = ["resnet18", "resnet50", "test_resnet"]  # basic; bottleneck; both, with a deep stem and avg-down


def build(backbone: str, normalizer: str = "fixup") -> nn.Module:
    torch.manual_seed(0)
    return build_model(backbone, normalizer, num_classes=10, in_chans=1, small_input=True)


def timm_blocks(backbone: str) -> list[nn.Module]:
    """The residual blocks of the same backbone as timm builds it with BatchNorm."""
    return [m for m in build(backbone, "bn").modules() if isinstance(m, BasicBlock | Bottleneck)]


def fixup_blocks(model: nn.Module) -> list[FixupBlock]:
    return [m for m in model.modules() if isinstance(m, FixupBlock)]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_no_normalization_layer_left(backbone):
    model = build(backbone)
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    assert not [m for m in model.modules() if isinstance(m, norm_types)]
    assert len(fixup_blocks(model)) == len(timm_blocks(backbone))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_zero_initialised_layers_and_exactly_zero_output(backbone):
    """Last conv of every branch and the classifier are 0, so every branch and the logits are exactly 0."""
    model = build(backbone)
    for block in fixup_blocks(model):
        assert not block.convs[-1].weight.any()
    classifier = model.get_classifier()[-1]
    assert not classifier.weight.any() and not classifier.bias.any()
    branch_outputs = []
    for block in fixup_blocks(model):
        block.register_forward_pre_hook(lambda block, inputs: branch_outputs.append(block.branch(inputs[0])))
    logits = model(torch.randn(4, 1, 28, 28))
    assert len(branch_outputs) == len(fixup_blocks(model))
    assert all(not output.any() for output in branch_outputs)
    assert not logits.any()


@pytest.mark.parametrize(("backbone", "branch_layers", "conv_name"), [("resnet18", 2, "layer4.1.convs.0"),
                                                                     ("resnet50", 3, "layer4.1.convs.1")])
def test_branch_init_std_follows_fixup_scaling(backbone, branch_layers, conv_name):
    """A 512->512 3x3 conv (2.4M weights): std within 2% of L^(-1/(2m-2)) * sqrt(2/fan_out)."""
    model = build(backbone)
    num_branches = len(timm_blocks(backbone))
    conv = model.get_submodule(conv_name)
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    expected = num_branches ** (-1 / (2 * branch_layers - 2)) * math.sqrt(2 / fan_out)
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_projection_shortcut_is_not_scaled():
    conv = build("resnet50").layer4[0].shortcut[-1]  # 1x1, 1024 -> 2048
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / conv.out_channels), rel=0.02)


@pytest.mark.parametrize("block_index", [0, 1])
def test_scalars_sit_where_the_official_code_puts_them(block_index):
    """With random scalars, a block equals the official forward written out from the recipe."""
    block = fixup_blocks(build("resnet50"))[block_index]  # 0: projection shortcut, 1: identity
    with torch.no_grad():
        for scalar in block.scalars():
            scalar.copy_(torch.randn(1))
        for conv in block.convs:
            conv.weight.normal_(0, 0.05)
    x = torch.randn(2, block.convs[0].in_channels, 8, 8)
    b1a, b2a, b3a = block.bias_before_conv
    b1b, b2b = block.bias_before_act
    conv1, conv2, conv3 = block.convs
    out = F.relu(conv1(x + b1a) + b1b)
    out = F.relu(conv2(out + b2a) + b2b)
    out = conv3(out + b3a) * block.scale + block.bias_out
    shortcut = x if block.shortcut is None else block.shortcut(x + b1a)
    torch.testing.assert_close(block(x), F.relu(out + shortcut))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_scalars_train_at_a_tenth_of_the_learning_rate(backbone):
    model = build(backbone)
    lr, weight_decay = 0.1, 5e-4
    groups = model.normalizer.param_groups(model, lr, weight_decay)
    scalar_group = next(g for g in groups if g["lr"] == pytest.approx(lr / 10))
    other_group = next(g for g in groups if g["lr"] == lr)
    # per block: a bias before each conv and activation plus multiplier and output bias (basic 5, bottleneck 7);
    # a bias for each stem norm and one before the classifier
    blocks = timm_blocks(backbone)
    stem_norms = sum(1 for name, m in build(backbone, "bn").named_modules()
                     if isinstance(m, nn.BatchNorm2d) and not name.startswith("layer"))
    expected = sum(5 if isinstance(b, BasicBlock) else 7 for b in blocks) + stem_norms + 1
    assert len(scalar_group["params"]) == expected
    assert all(p.numel() == 1 for p in scalar_group["params"])
    assert not any(p.numel() == 1 for p in other_group["params"])
    assert len(scalar_group["params"]) + len(other_group["params"]) == len(list(model.parameters()))
    assert scalar_group["weight_decay"] == other_group["weight_decay"] == weight_decay  # as the official code


def test_non_resnets_and_unsupported_blocks_are_user_errors():
    with pytest.raises(UserError, match="not a timm ResNet"):
        build("mobilenetv2_050")
    with pytest.raises(UserError, match="uses se"):
        build("seresnet18")
