"""WRN-28-10 registered with timm, as the TENT CIFAR-10-C table uses it."""

import timm
import torch

from repro.adapt import create_method
from repro.models import build_model


def test_wrn28_10_is_a_timm_model_with_the_papers_size():
    assert timm.is_model("wrn28_10")
    model = build_model("wrn28_10", "bn", num_classes=10)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 36.5  # WRN paper: 36.5M
    assert "block1.layer.0.convShortcut.weight" in model.state_dict()
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert len(create_method("ptbn", model).adapted_layers) == 25  # 12 blocks x 2 BNs + the final BN
