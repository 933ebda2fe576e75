"""One forward with per-micro-batch ("ghost") statistics equals the sequential micro-batch passes."""

import copy

import pytest
import torch
from torch import nn

from repro.models import build_model
from repro.norms import ghost
from repro.norms.ghost import can_run_in_one_pass, ghost_batches
from repro.train import TrainConfig, seed_everything
from repro.train.loop import _forward_backward

torch.set_num_threads(1)

BATCH, MICRO_BATCH, STEPS = 16, 4, 5
CPU = torch.device("cpu")
ONE_PASS = {"bn": {}, "bn_cumulative": {"momentum": None}, "gn": {"group_size": 8}, "mimicnorm": {}, "fixup": {},
            # r and d clipped from the first step, and moving: running statistics differ from group to group
            "brn": {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0, "r_max_ramp_steps": 2, "d_max_ramp_steps": 2,
                    "momentum": 0.3},
            # windows of 3 filled from the second step (burn-in 1), compensated and naive
            "cbn": {"window": 3, "burnin_iterations": 1}, "cbn_naive": {"window": 3, "burnin_iterations": 1}}


def _model(normalizer: str) -> nn.Module:
    seed_everything(0)
    name = "bn" if normalizer == "bn_cumulative" else normalizer
    model = build_model("test_resnet", name, num_classes=10, in_chans=1, **ONE_PASS.get(normalizer, {}))
    return model.double().train()  # float64 up to the logits (the trainer's loss is float32)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 28, 28, generator=generator, dtype=torch.float64),
             torch.randint(0, 10, (BATCH,), generator=generator)) for _ in range(STEPS)]


def _train(model: nn.Module, one_pass: bool) -> tuple[list[float], list[list[torch.Tensor]]]:
    """STEPS SGD steps; returns the summed batch losses and each step's gradients."""
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.05, micro_batch=MICRO_BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    losses, gradients = [], []
    for images, labels in _batches():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = _forward_backward(model, images, labels, cfg, CPU, torch.Generator(), one_pass=one_pass)
        losses.append(loss.item())
        gradients.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
        model.normalizer.after_step(model)
    return losses, gradients


@pytest.fixture(params=["grouped", "per_group"])
def statistics_path(request, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both forms of the ghost layers: one set of kernels for all groups (CUDA's), the layer per group (CPU's)."""
    monkeypatch.setattr(ghost, "grouped_statistics", lambda x: request.param == "grouped")


@pytest.mark.parametrize("normalizer", sorted(ONE_PASS))
def test_one_pass_equals_sequential_micro_batches(normalizer, statistics_path):
    sequential = _model(normalizer)
    one_pass = copy.deepcopy(sequential)
    assert can_run_in_one_pass(one_pass)
    want_losses, want_grads = _train(sequential, one_pass=False)
    got_losses, got_grads = _train(one_pass, one_pass=True)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-6, atol=0)
    for got_step, want_step in zip(got_grads, want_grads, strict=True):
        for got, want in zip(got_step, want_step, strict=True):  # float32 rounding of the loss, relative to the layer
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item() + 1e-12)
    for (name, got), want in zip(one_pass.state_dict().items(), sequential.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=f"{name} differs")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_running_statistics_follow_each_group_in_order(momentum, memory_format, statistics_path):
    """Against nn.BatchNorm2d fed the groups one after the other (an independent computation)."""
    x = (torch.randn(12, 3, 5, 5) * 3 + 1).contiguous(memory_format=memory_format)
    reference = nn.BatchNorm2d(3, momentum=momentum).train()
    ghost = copy.deepcopy(reference)
    want = torch.cat([reference(group) for group in x.split(4)])
    with ghost_batches(ghost, 4):
        got = ghost(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=memory_format)  # the next convolution keeps its layout
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, buffer), getattr(reference, buffer))
    assert "forward" not in vars(ghost)  # the instance is restored when the block ends


def test_ghost_batches_leave_eval_mode_unchanged():
    bn = nn.BatchNorm1d(4)
    bn.running_mean.fill_(2.0)
    x = torch.randn(8, 4)
    want = bn.eval()(x)
    with ghost_batches(bn, 2):
        torch.testing.assert_close(bn(x), want)


def test_mixup_and_dropout_keep_the_sequential_path():
    model = _model("bn")
    assert can_run_in_one_pass(model) and not can_run_in_one_pass(model, mixup_alpha=0.2)
    model.drop_rate = 0.1  # timm's functional head dropout
    assert not can_run_in_one_pass(model)
