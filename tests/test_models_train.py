"""build_model with bn/gn/none, the CIFAR-style stem, the schedule, and seeding."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from repro.data import load_dataset
from repro.errors import UserError
from repro.models import build_model
from repro.norms.groupnorm import ChannelsFirstBf16GroupNorm, GroupNorm
from repro.train import TrainConfig, train_and_evaluate
from repro.train.schedule import lr_multiplier


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_bn_gn_none_on_resnet18_small_input() -> None:
    bn = build_model("resnet18", "bn", num_classes=10, in_chans=1, small_input=True)
    gn = build_model("resnet18", "gn", num_classes=10, in_chans=1, small_input=True)
    none = build_model("resnet18", "none", num_classes=10, in_chans=1, small_input=True)
    assert _count(bn, nn.BatchNorm2d) == 20  # 8 blocks × 2 + 3 downsample + stem
    assert _count(gn, nn.BatchNorm2d) == 0 and _count(gn, nn.GroupNorm) == 20
    assert _count(none, nn.BatchNorm2d) == 0 and _count(none, nn.GroupNorm) == 0
    assert bn.conv1.kernel_size == (3, 3) and bn.conv1.stride == (1, 1) and isinstance(bn.maxpool, nn.Identity)
    assert bn(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_gn_keeps_fused_activation_and_group_size() -> None:
    """efficientnet's BatchNormAct2d: the GroupNorm replacement keeps the activation; 16/24-channel layers work."""
    model = build_model("efficientnet_b0", "gn", num_classes=10, group_size=8)
    norm_act = model.bn1
    assert isinstance(norm_act[0], nn.GroupNorm) and isinstance(norm_act[2], nn.SiLU)
    assert all(m.num_channels // m.num_groups == 8 for m in model.modules() if isinstance(m, nn.GroupNorm))
    with pytest.raises(UserError, match="not divisible by groups=32; set group_size"):
        build_model("efficientnet_b0", "gn", num_classes=10)


def test_normalizer_factory_takes_name_class_or_partial() -> None:
    by_partial = build_model("resnet18", partial(GroupNorm, groups=4), num_classes=10)
    assert {m.num_groups for m in by_partial.modules() if isinstance(m, nn.GroupNorm)} == {4}
    by_class = build_model("resnet18", GroupNorm, num_classes=10, groups=16)
    assert {m.num_groups for m in by_class.modules() if isinstance(m, nn.GroupNorm)} == {16}
    with pytest.raises(UserError, match="unknown normalizer 'bogus'"):
        build_model("resnet18", "bogus", num_classes=10)
    with pytest.raises(UserError, match="allowed: \\['groups', 'group_size', 'eps'\\]"):
        build_model("resnet18", "gn", num_classes=10, group_count=3)


def test_gn_zero_init_of_last_norm_carries_over() -> None:
    """timm zero-initialises each block's last BN weight (the GN paper does the same for GN)."""
    model = build_model("resnet18", "gn", num_classes=10)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0 and torch.all(model.layer1[0].bn1.weight == 1)


def test_schedule_warmup_cosine_and_step() -> None:
    cosine = lr_multiplier(TrainConfig(epochs=10, batch_size=1, lr=1, warmup_epochs=1), steps_per_epoch=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    step = lr_multiplier(TrainConfig(epochs=10, batch_size=1, lr=1, schedule="step", milestones=[5, 8]), 4)
    assert [step(s) for s in (19, 20, 31, 32)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_same_seed_same_curve_and_loss_falls() -> None:
    data = load_dataset("fashion_mnist", generated=True).subset(160, 64)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, crop_padding=2, flip=True)

    def run(seed: int) -> list[float]:
        torch.manual_seed(seed)
        model = build_model("test_resnet", "bn", num_classes=10, in_chans=1, small_input=True)
        result = train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=seed, progress=False)
        return [c["train_loss"] for c in result.curve]

    first, second = run(0), run(0)
    assert first == second
    assert first[-1] < first[0]


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_applies_on_cpu_too(channels_last: bool) -> None:
    """Measured on 2 CPU threads, ResNet-20 trains 1.4x faster channels-last, so the trainer uses it on CPU."""
    data = load_dataset("fashion_mnist", generated=True).subset(64, 32)
    model = build_model("resnet20", "bn", num_classes=data.num_classes, in_chans=data.in_chans)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, channels_last=channels_last)
    assert train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=0, progress=False).status == "ok"
    weight = model.layer1[0].conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert weight.is_contiguous() != channels_last


def test_amp_cpu_trains_and_evaluates_in_bf16_close_to_float32() -> None:
    """``amp_cpu`` puts training and evaluation under CPU bf16 autocast (``amp``, on by default, does not); the
    loss stays float32, and a short run's losses stay near the float32 run's."""
    data = load_dataset("fashion_mnist", generated=True).subset(64, 32)

    def run(amp_cpu: bool) -> tuple[set, list[float]]:
        torch.manual_seed(0)
        model = build_model("test_resnet", "gn", num_classes=10, in_chans=1, small_input=True, group_size=8)
        conv_outputs = set()
        model.conv1.register_forward_hook(lambda module, _, out: conv_outputs.add((module.training, out.dtype)))
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, amp_cpu=amp_cpu)
        result = train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=0, progress=False)
        assert result.status == "ok"
        return conv_outputs, [c[key] for c in result.curve for key in ("train_loss", "test_loss")]

    (fp32_dtypes, fp32_losses), (bf16_dtypes, bf16_losses) = run(False), run(True)
    assert fp32_dtypes == {(True, torch.float32), (False, torch.float32)}
    assert bf16_dtypes == {(True, torch.bfloat16), (False, torch.bfloat16)}
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.01) and bf16_losses != fp32_losses


def test_gn_normalizes_channels_last_bf16_in_the_contiguous_layout() -> None:
    """The contiguous kernel computes what the (slow) channels-last one does, up to bf16 rounding, and hands back
    the channels-last layout; float32 inputs take ``nn.GroupNorm``'s own path unchanged."""
    torch.manual_seed(0)
    gn = ChannelsFirstBf16GroupNorm(8, 16)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    assert torch.equal(gn(x), nn.GroupNorm.forward(gn, x))
    upstream = torch.randn(4, 16, 6, 6).to(torch.bfloat16)
    outputs, gradients = [], []
    for forward in (gn.forward, lambda t: nn.GroupNorm.forward(gn, t)):
        half = x.to(torch.bfloat16).requires_grad_()
        out = forward(half)
        out.backward(upstream)
        outputs.append(out)
        gradients.append((half.grad, gn.weight.grad.clone(), gn.bias.grad.clone()))
        gn.zero_grad(set_to_none=True)
    assert outputs[0].dtype == torch.bfloat16 and outputs[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-2, rtol=1e-2)
