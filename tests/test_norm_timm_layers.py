"""timm's own layers as normalizers: each converted site computes what timm's module, built directly, computes."""

import pytest
import torch
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, GroupNorm1, LayerNorm2d
from torch import nn

from repro.errors import UserError
from repro.norms import create_normalizer
from repro.norms.timm_layers import activation_fed_by_each_batchnorm

torch.set_num_threads(1)
CHANNELS = 16


def conv_bn_relu() -> nn.Sequential:
    """A conv, a BatchNorm and the ReLU it feeds: the site every normalizer converts."""
    return nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(CHANNELS), nn.ReLU())


def randomize(module: nn.Module) -> None:
    """Parameters and buffers away from their init, so a layer that ignored one would compute other numbers."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)


# normalizer, its options, timm's module built directly, and whether the ReLU after the site stays
LAYERS = [
    ("evonorm_b0", {}, lambda: EvoNorm2dB0(CHANNELS, apply_act=True, eps=1e-3), False),
    ("evonorm_s0", {"group_size": 8}, lambda: EvoNorm2dS0(CHANNELS, group_size=8, apply_act=True, eps=1e-5), False),
    ("frn_tlu", {}, lambda: FilterResponseNormTlu2d(CHANNELS, apply_act=True, eps=1e-5), False),
    ("layernorm2d", {}, lambda: LayerNorm2d(CHANNELS, eps=1e-6), True),
    ("gn1", {}, lambda: GroupNorm1(CHANNELS, eps=1e-5), True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "options", "timm_module", "keeps_relu"), LAYERS, ids=[row[0] for row in LAYERS])
def test_matches_timm_module(name, options, timm_module, keeps_relu, training):
    torch.manual_seed(0)
    model = create_normalizer(name, **options).apply(conv_bn_relu())
    reference = timm_module()
    assert type(model[1]) is type(reference)
    randomize(model[1])
    reference.load_state_dict(model[1].state_dict())
    model.train(training)
    reference.train(training)
    x = torch.randn(4, 3, 8, 8)
    features = model[0](x)
    expected = reference(features)
    expected = expected.relu() if keeps_relu else expected
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert isinstance(model[2], nn.ReLU) is keeps_relu


def test_evonorm_s0_is_its_definition():
    """x · sigmoid(v·x) / group std · γ + β (Liu et al. 2020, eq. for S0), with std over each sample's group."""
    torch.manual_seed(0)
    layer = create_normalizer("evonorm_s0", group_size=8).apply(conv_bn_relu())[1]
    randomize(layer)
    x = torch.randn(2, CHANNELS, 5, 5)
    grouped = x.view(2, 2, 8 * 25)
    std = (grouped.var(-1, unbiased=False, keepdim=True) + layer.eps).sqrt().expand_as(grouped).reshape(x.shape)
    view = (1, -1, 1, 1)
    expected = x * torch.sigmoid(layer.v.view(view) * x) / std * layer.weight.view(view) + layer.bias.view(view)
    torch.testing.assert_close(layer(x), expected)


def test_last_norm_of_a_residual_branch_runs_without_nonlinearity():
    """``x += shortcut`` between BN and activation: the activation stays, the layer runs with apply_act=False."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
            self.bn, self.act = nn.BatchNorm2d(CHANNELS), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn(self.conv(x))
            out += x
            return self.act(out)

    model = create_normalizer("frn_tlu").apply(Residual())
    assert isinstance(model.act, nn.ReLU)
    assert model.bn.tau is None  # no TLU


def test_shared_activation_is_refused():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, CHANNELS, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.bn(self.act(self.conv(x))))

    with pytest.raises(UserError, match="activation act"):
        activation_fed_by_each_batchnorm(Shared())
