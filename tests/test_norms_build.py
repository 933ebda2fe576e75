"""Every registered normalizer builds on timm ResNets and on the light backbone, and trains."""

import pytest
import torch
from torch import nn

from repro.errors import UserError
from repro.models import build_model
from repro.norms import NORMALIZERS
from repro.train import TrainConfig, seed_everything, train_and_evaluate

torch.set_num_threads(1)

ALL_NORMALIZERS = NORMALIZERS.names()
#: normalizers defined only for residual networks: they must refuse the light backbone with a user error
RESNET_ONLY = {"fixup"}
#: normalizers that must build on the light backbone; any other registered one may refuse it with a user error
LIGHT_APPLICABLE = {"bn", "gn", "none", "mimicnorm", "qbn", "evonorm_b0", "evonorm_s0", "frn_tlu", "layernorm2d",
                    "gn1"}
#: depthwise convs, builds and converts at 28x28 with one input channel; all its widths are multiples of 8
LIGHT_BACKBONE = "mobilenetv2_050"
#: options without which a normalizer does not fit narrow models (8- or 16-channel layers cannot form 32 groups)
NARROW_OPTIONS = {"gn": {"group_size": 8}, "evonorm_s0": {"group_size": 8}}


def build(backbone: str, normalizer: str, **options) -> nn.Module:
    return build_model(backbone, normalizer, num_classes=10, in_chans=1, small_input=True, **options)


def check_forward(model: nn.Module) -> None:
    logits = model(torch.randn(4, 1, 28, 28))
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()


def test_registry_holds_the_issue_normalizers():
    assert {"bn", "gn", "none", "mimicnorm", "fixup", "qbn"} <= set(ALL_NORMALIZERS)


@pytest.mark.parametrize("normalizer", ALL_NORMALIZERS)
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_builds_on_resnets(backbone, normalizer):
    model = build(backbone, normalizer)
    assert model.normalizer.name == normalizer
    check_forward(model)


@pytest.mark.parametrize("normalizer", ALL_NORMALIZERS)
def test_builds_on_light_backbone(normalizer):
    if normalizer in RESNET_ONLY:
        with pytest.raises(UserError, match="not a timm ResNet"):
            build(LIGHT_BACKBONE, normalizer)
        return
    try:
        model = build(LIGHT_BACKBONE, normalizer, **NARROW_OPTIONS.get(normalizer, {}))
    except UserError as err:
        if normalizer in LIGHT_APPLICABLE:
            raise
        pytest.skip(f"{normalizer} does not apply to {LIGHT_BACKBONE}: {err}")
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    check_forward(model)


@pytest.mark.parametrize("normalizer", ALL_NORMALIZERS)
def test_trains_with_falling_loss(normalizer, fashion_mnist):
    """Two epochs of six steps through the real trainer (param_groups and after_step included)."""
    seed_everything(0)
    # timm's tiny ResNet: basic and bottleneck blocks, deep stem
    model = build("test_resnet", normalizer, **NARROW_OPTIONS.get(normalizer, {}))
    config = TrainConfig(epochs=2, batch_size=32, lr=0.1, schedule="constant", eval_batch_size=200)
    result = train_and_evaluate(model, fashion_mnist.subset(192, 200), config, device=torch.device("cpu"), seed=0,
                                progress=False)
    assert result.status == "ok"
    first, second = (epoch["train_loss"] for epoch in result.curve)
    assert second < first
