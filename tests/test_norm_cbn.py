"""Cross-Iteration BatchNorm: reduces to BN, pools windows as defined, compensates like a Taylor expansion should."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repro.data import load_dataset
from repro.errors import UserError
from repro.models import build_model
from repro.norms import create_normalizer
from repro.norms.cbn import CrossIterationBatchNorm2d, _PooledBatchNorm, statistics_gradients
from repro.train import TrainConfig, seed_everything, train_and_evaluate

torch.set_num_threads(1)

DOUBLE = torch.float64


def _conv_and_cbn(seed: int = 0, **options) -> tuple[nn.Conv2d, CrossIterationBatchNorm2d]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=DOUBLE)
    cbn = CrossIterationBatchNorm2d(4, conv, dtype=DOUBLE, **options)
    with torch.no_grad():  # non-trivial affine, so that mistakes in γ, β handling show
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.normal_()
    return conv, cbn


def _batches(count: int, seed: int = 1, size: int = 4) -> list[torch.Tensor]:
    """Batches with different means and scales, so that pooling them differs from any single one."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, dtype=DOUBLE, generator=generator) * (1 + 0.5 * t) + 0.3 * t
            for t in range(count)]


def _normalized(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, cbn: nn.BatchNorm2d,
                eps_inside_sqrt: bool) -> torch.Tensor:
    """γ·(y − μ)/std + β with std = √(σ² + eps) (BN) or √σ² + eps (official CBN)."""
    std = (var + cbn.eps).sqrt() if eps_inside_sqrt else var.sqrt() + cbn.eps
    shape = (1, -1, 1, 1)
    return (y - mean.view(shape)) / std.view(shape) * cbn.weight.view(shape) + cbn.bias.view(shape)


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ and mean square ν per channel."""
    return y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))


@pytest.mark.parametrize("options", [
    {"window": 1},
    {"window": 4, "rho": 0.0, "burnin_iterations": 10**9},
], ids=["window-1", "rho-0-burnin-never-ends"])
def test_degenerate_cbn_is_batchnorm_bit_for_bit(options):
    conv, cbn = _conv_and_cbn(eps_inside_sqrt=True, **options)
    conv_bn = copy.deepcopy(conv)
    batchnorm = nn.BatchNorm2d(4, dtype=DOUBLE)
    batchnorm.load_state_dict(cbn.state_dict())
    optimizer = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=0.1)
    optimizer_bn = torch.optim.SGD([*conv_bn.parameters(), *batchnorm.parameters()], lr=0.1)
    for x in _batches(5):
        out, out_bn = cbn(conv(x)), batchnorm(conv_bn(x))
        assert torch.equal(out, out_bn)
        target = torch.ones_like(out)
        F.mse_loss(out, target).backward()
        F.mse_loss(out_bn, target).backward()
        assert torch.equal(conv.weight.grad, conv_bn.weight.grad)
        assert torch.equal(cbn.weight.grad, batchnorm.weight.grad)
        for opt in (optimizer, optimizer_bn):
            opt.step()
            opt.zero_grad()
        cbn.end_iteration()
    assert torch.equal(cbn.running_mean, batchnorm.running_mean)
    assert torch.equal(cbn.running_var, batchnorm.running_var)
    cbn.eval()
    batchnorm.eval()
    assert torch.equal(cbn(conv(x)), batchnorm(conv_bn(x)))


def test_plain_path_with_eps_outside_the_sqrt_uses_biased_batch_variance_and_bn_running_stats():
    conv, cbn = _conv_and_cbn(window=1)
    batchnorm = nn.BatchNorm2d(4, dtype=DOUBLE)  # reference for the running statistics only
    for x in _batches(3):
        y = conv(x).detach()
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
        expected = _normalized(y, mean, var, cbn, eps_inside_sqrt=False)
        torch.testing.assert_close(cbn(y), expected, rtol=1e-12, atol=1e-12)
        batchnorm(y)
    torch.testing.assert_close(cbn.running_mean, batchnorm.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cbn.running_var, batchnorm.running_var, rtol=1e-12, atol=1e-12)
    cbn.eval()
    expected = _normalized(y, batchnorm.running_mean, batchnorm.running_var, cbn, eps_inside_sqrt=False)
    torch.testing.assert_close(cbn(y), expected, rtol=1e-12, atol=1e-12)


def test_with_unchanged_weights_the_window_pools_the_last_k_batches():
    """Equal-sized batches under fixed weights: the pooled μ̄, σ̄² are the statistics of their concatenation,
    and gradients flow through the current batch only."""
    conv, cbn = _conv_and_cbn(window=3, eps_inside_sqrt=True)
    outputs = []
    for t, x in enumerate(_batches(5)):
        x = x.requires_grad_()
        y = conv(x)
        out = cbn(y)
        outputs.append(y.detach())
        pooled = torch.cat([*outputs[max(0, t - 2) : t], y])  # earlier batches as constants, the current with grad
        var, mean = torch.var_mean(pooled, dim=(0, 2, 3), unbiased=False)
        expected = _normalized(y, mean, var, cbn, eps_inside_sqrt=True)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        upstream = torch.randn_like(out)
        grad, = torch.autograd.grad((out * upstream).sum(), x, retain_graph=True)
        expected_grad, = torch.autograd.grad((expected * upstream).sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
        cbn.end_iteration()


@pytest.mark.parametrize("rho", [1.0, 0.5, 0.0])
def test_compensation_matches_statistics_recomputed_under_current_weights(rho):
    """μ is linear in W, so full compensation is exact; for ν the remainder is exactly E[(ΔW∗x)²].

    ρ scales the first-order term (ρ = 0: the statistics as stored, the naive average's input).
    """
    conv, cbn = _conv_and_cbn(window=4, rho=rho)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.2)
    inputs, weights = [], []
    for x in _batches(7):  # 7 iterations in a window of 3: the ring has wrapped past its first slot
        inputs.append(x)
        weights.append(conv.weight.detach().clone())
        out = cbn(conv(x))
        F.mse_loss(out, torch.linspace(-1, 1, out.numel(), dtype=DOUBLE).view_as(out)).backward()
        optimizer.step()
        optimizer.zero_grad()
        cbn.end_iteration()
    current = conv.weight.detach()
    compensated_mean, compensated_mean_square = cbn.compensated_past_statistics()
    assert len(compensated_mean) == 3  # window 4 = the current iteration and the last 3
    naive_error = compensated_error = 0.0
    for k, (x, old) in enumerate(zip(inputs[-3:], weights[-3:], strict=True)):
        oracle_mean, oracle_mean_square = _channel_stats(F.conv2d(x, current, padding=1))
        naive_mean, naive_mean_square = _channel_stats(F.conv2d(x, old, padding=1))
        assert not torch.allclose(naive_mean, oracle_mean)  # the weights did move
        remainder = (F.conv2d(x, current - old, padding=1) ** 2).mean((0, 2, 3))
        first_order_mean_square = oracle_mean_square - remainder - naive_mean_square
        torch.testing.assert_close(compensated_mean[k], naive_mean + rho * (oracle_mean - naive_mean),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(compensated_mean_square[k], naive_mean_square + rho * first_order_mean_square,
                                   rtol=1e-9, atol=1e-12)
        naive_error += (naive_mean_square - oracle_mean_square).abs().sum().item()
        compensated_error += (compensated_mean_square[k] - oracle_mean_square).abs().sum().item()
    if rho == 1.0:
        assert compensated_error < naive_error


@pytest.mark.parametrize("eps_inside_sqrt", [True, False], ids=["bn-eps", "official-eps"])
@pytest.mark.parametrize("groups", [1, 3])
def test_pooled_normalization_and_its_gradients_follow_the_official_aggregation(groups, eps_inside_sqrt):
    """The fused moments, pooling and normalization against the official code's aggregation written in plain
    operations and differentiated by autograd: μ̄ the mean of the kept μ, σ̄² the mean of the kept ν minus μ̄², an
    entry kept where its ν − μ² ≥ 0 (one past entry of channel 0 is not). Outputs and the gradients of y, γ, β."""
    generator = torch.Generator().manual_seed(0)
    y = (torch.randn(2 * groups, 4, 5, 5, dtype=DOUBLE, generator=generator) * 1.5 + 0.3).requires_grad_()
    past_means = torch.randn(groups, 2, 4, dtype=DOUBLE, generator=generator)
    past_mean_squares = past_means**2 + torch.rand(groups, 2, 4, dtype=DOUBLE, generator=generator)
    past_mean_squares[:, 1, 0] = past_means[:, 1, 0] ** 2 - 0.5
    weight = (torch.rand(4, dtype=DOUBLE, generator=generator) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=DOUBLE, generator=generator).requires_grad_()
    eps = 1e-3
    out, mean_now, var_now = _PooledBatchNorm.apply(y, groups, past_means, past_mean_squares, weight, bias, eps,
                                                    eps_inside_sqrt)
    expected = []
    for group, chunk in enumerate(y.chunk(groups)):
        var, mean = torch.var_mean(chunk, dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean_now[group], mean.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var_now[group], var.detach(), rtol=1e-12, atol=1e-14)
        kept = (past_mean_squares[group] - past_means[group] ** 2 >= 0).to(DOUBLE)  # (stored, C)
        count = 1 + kept.sum(0)
        pooled_mean = (mean + (kept * past_means[group]).sum(0)) / count
        pooled_var = (var + mean**2 + (kept * past_mean_squares[group]).sum(0)) / count - pooled_mean**2
        std = (pooled_var + eps).sqrt() if eps_inside_sqrt else pooled_var.sqrt() + eps
        shape = (1, -1, 1, 1)
        expected.append((chunk - pooled_mean.view(shape)) / std.view(shape) * weight.view(shape) + bias.view(shape))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(out.shape, dtype=DOUBLE, generator=generator)
    got = torch.autograd.grad((out * upstream).sum(), (y, weight, bias))
    want = torch.autograd.grad((expected * upstream).sum(), (y, weight, bias))
    for got_grad, want_grad in zip(got, want, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-11)


def test_entries_with_negative_compensated_variance_are_dropped():
    """Flipping filter 0 (ΔW = −2W) sends its compensated ν to ν − 2·⟨∂ν/∂W, W⟩ = −3ν < 0: that channel falls back
    to the current batch, the untouched channels pool both batches."""
    conv, cbn = _conv_and_cbn(window=2, eps_inside_sqrt=True)
    x_old, x_new = _batches(2)
    y_old = conv(x_old)
    cbn(y_old)
    cbn.end_iteration()
    old_mean, old_mean_square = _channel_stats(y_old.detach())
    with torch.no_grad():
        conv.weight[0].neg_()
    compensated_mean, compensated_mean_square = cbn.compensated_past_statistics()
    torch.testing.assert_close(compensated_mean[0, 0], -old_mean[0])
    torch.testing.assert_close(compensated_mean_square[0, 0], -3 * old_mean_square[0])
    y_new = conv(x_new)
    out = cbn(y_new).detach()
    y_new = y_new.detach()
    var_new, mean_new = torch.var_mean(y_new, dim=(0, 2, 3), unbiased=False)
    var_pooled, mean_pooled = torch.var_mean(torch.cat([y_old.detach(), y_new]), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(out[:, :1], _normalized(y_new, mean_new, var_new, cbn, True)[:, :1])
    torch.testing.assert_close(out[:, 1:], _normalized(y_new, mean_pooled, var_pooled, cbn, True)[:, 1:])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_closed_form_statistics_gradients_equal_autograd(memory_format):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=2, groups=2, bias=True, dtype=DOUBLE)
    x = torch.randn(5, 4, 11, 9, dtype=DOUBLE).contiguous(memory_format=memory_format)
    y = conv(x)
    mean, mean_square = _channel_stats(y)
    mean_grad, = torch.autograd.grad(mean.sum(), conv.weight, retain_graph=True)
    mean_square_grad, = torch.autograd.grad(mean_square.sum(), conv.weight)
    mean_patches, closed_mean_square_grad = (g[0] for g in statistics_gradients(conv, x, y.detach()))
    per_group = mean_grad.reshape(conv.groups, conv.out_channels // conv.groups, -1)
    torch.testing.assert_close(per_group, mean_patches.unsqueeze(1).expand_as(per_group), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(closed_mean_square_grad, mean_square_grad, rtol=1e-12, atol=1e-14)


def test_statistics_gradients_of_image_groups_are_each_groups_own():
    """Micro-batches side by side as channels in one weight-gradient convolution equal one call per micro-batch."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=DOUBLE)
    x = torch.randn(6, 4, 9, 9, dtype=DOUBLE)
    y = conv(x).detach()
    together = statistics_gradients(conv, x, y, groups=3)
    for g, (x_group, y_group) in enumerate(zip(x.split(2), y.split(2), strict=True)):
        alone = statistics_gradients(conv, x_group, y_group)
        for got, want in zip(together, alone, strict=True):
            torch.testing.assert_close(got[g], want[0], rtol=1e-12, atol=1e-14)


def test_each_micro_batch_position_keeps_its_own_window():
    conv, cbn = _conv_and_cbn(window=2, eps_inside_sqrt=True)
    first = []
    for x in _batches(2, seed=2):  # iteration 0: micro-batches a, b
        y = conv(x)
        cbn(y)
        first.append(y.detach())
    cbn.end_iteration()
    for y_old, x in zip(first, _batches(2, seed=3), strict=True):  # iteration 1: a pools with a, b with b
        y = conv(x)
        var, mean = torch.var_mean(torch.cat([y_old, y.detach()]), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(cbn(y).detach(), _normalized(y.detach(), mean, var, cbn, True))


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
def test_a_saved_training_state_restores_the_window_at_every_fill_level(iterations):
    """Partly filled, full, and wrapped past its first slot (window 3 holds 2 past iterations): a layer restored
    from ``training_state`` compensates and normalizes like the layer it was saved from, for both micro-batch
    positions. (Until the eighth session the restored ∂ν/∂W came back with its channels sliced or rolled unless the
    ring's next slot was its first.)"""
    conv, cbn = _conv_and_cbn(window=3)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.2)
    batches = iter(_batches(2 * iterations + 2))
    for _ in range(iterations):
        for _ in range(2):  # two micro-batch positions
            cbn(conv(next(batches))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cbn.end_iteration()
    restored_conv, restored = _conv_and_cbn(seed=1, window=3)
    restored_conv.load_state_dict(conv.state_dict())
    restored.load_state_dict(cbn.state_dict())
    restored.load_training_state(cbn.training_state())
    for position in range(2):
        for got, want in zip(restored.compensated_past_statistics(position), cbn.compensated_past_statistics(position),
                             strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        x = next(batches)
        torch.testing.assert_close(restored(restored_conv(x)), cbn(conv(x)), rtol=0, atol=0)


def test_a_weight_update_without_end_iteration_is_an_error():
    conv, cbn = _conv_and_cbn(window=2)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = _batches(1)[0]
    cbn(conv(x)).square().mean().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="end_iteration"):
        cbn(conv(x))


def test_cbn_pairs_every_batchnorm_of_a_resnet_with_its_conv():
    model = build_model("resnet18", "cbn", num_classes=10, in_chans=1, small_input=True)
    reference = build_model("resnet18", "bn", num_classes=10, in_chans=1, small_input=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert model.bn1.conv is model.conv1
    block = model.layer2[0]
    assert block.bn1.conv is block.conv1 and block.bn2.conv is block.conv2
    assert block.downsample[1].conv is block.downsample[0]
    deep_stem = build_model("test_resnet", "cbn_naive", num_classes=10, in_chans=1)  # conv stem, avg-pool shortcut
    assert deep_stem.bn1.conv is deep_stem.conv1[-1] and deep_stem.conv1[1].conv is deep_stem.conv1[0]
    assert deep_stem.layer2[0].downsample[2].conv is deep_stem.layer2[0].downsample[1]
    assert {m.rho for m in deep_stem.modules() if isinstance(m, CrossIterationBatchNorm2d)} == {0.0}


def test_cbn_pairs_depthwise_convs_and_keeps_fused_activations_in_mobilenetv2():
    """Pairing follows the tensors, so a light family with depthwise convs and BatchNormAct2d works too."""
    reference = build_model("mobilenetv2_050", "bn", num_classes=10, in_chans=1, small_input=True)
    model = build_model("mobilenetv2_050", "cbn", num_classes=10, in_chans=1, small_input=True)
    block = model.blocks[1][0]  # fused BatchNormAct2d becomes (CBN, drop, activation)
    assert block.bn2[0].conv is block.conv_dw and block.conv_dw.groups == block.conv_dw.out_channels > 1
    assert block.bn1[0].conv is block.conv_pw and block.bn3[0].conv is block.conv_pwl
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(layers) == sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert relu6 == sum(isinstance(m, nn.ReLU6) for m in reference.modules()) > 0


def test_cbn_refuses_a_batchnorm_without_a_conv_before_it():
    with pytest.raises(UserError, match=r"no nn\.Conv2d directly before BatchNorm 0"):
        create_normalizer("cbn").apply(nn.Sequential(nn.BatchNorm2d(3)))


def test_resnet18_with_cbn_trains_on_fashion_mnist():
    data = load_dataset("fashion_mnist").subset(64, 32)
    seed_everything(0)
    model = build_model("resnet18", "cbn", num_classes=10, in_chans=1, burnin_epochs=1)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.02, schedule="constant", weight_decay=0.0, eval_batch_size=32)
    result = train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=0, progress=False)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    steps_per_epoch = 64 // 16
    assert {m.burnin_iterations for m in layers} == {1 * steps_per_epoch}
    assert {m.iterations_done for m in layers} == {3 * steps_per_epoch}
    assert all(len(m.compensated_past_statistics()[0]) == m.window - 1 for m in layers)  # the windows filled
    losses = [epoch["train_loss"] for epoch in result.curve]
    assert result.status == "ok" and losses[-1] < losses[0], losses
