"""Batch Renormalization: plain BN when r and d are clipped to 1 and 0, the paper's formula otherwise."""

import pytest
import torch
from torch import nn

from repro.models import build_model
from repro.norms.batch_renorm import BatchRenorm2d

torch.set_num_threads(1)


def _random_affine(*layers: nn.BatchNorm2d) -> None:
    """Same non-trivial γ, β in every layer (the defaults 1 and 0 would hide mistakes in the affine algebra)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(layers[0].num_features, generator=generator) + 0.5
    bias = torch.randn(layers[0].num_features, generator=generator)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def test_brn_with_r_max_1_and_d_max_0_is_batchnorm_bit_for_bit():
    renorm = BatchRenorm2d(5, r_max=1.0, d_max=0.0, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    batchnorm = nn.BatchNorm2d(5)
    _random_affine(renorm, batchnorm)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):  # the running statistics drift away from the batch's, so unclipped r, d would differ
        x = (torch.randn(6, 5, 7, 7, generator=generator) * (step + 1) + step).requires_grad_()
        x_bn = x.detach().clone().requires_grad_()
        upstream = torch.randn(6, 5, 7, 7, generator=generator)
        out, out_bn = renorm(x), batchnorm(x_bn)
        (out * upstream).sum().backward()
        (out_bn * upstream).sum().backward()
        renorm.advance_schedule()
        assert torch.equal(out, out_bn)
        assert torch.equal(x.grad, x_bn.grad)
    assert torch.equal(renorm.weight.grad, batchnorm.weight.grad)
    assert torch.equal(renorm.bias.grad, batchnorm.bias.grad)
    assert torch.equal(renorm.running_mean, batchnorm.running_mean)
    assert torch.equal(renorm.running_var, batchnorm.running_var)
    renorm.eval()
    batchnorm.eval()
    assert torch.equal(renorm(x.detach()), batchnorm(x.detach()))


def test_schedule_is_plain_bn_during_warmup_then_linear_ramps():
    renorm = BatchRenorm2d(1, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_ramp_steps=20, d_max_ramp_steps=10)
    expected = {0: (1.0, 0.0), 10: (1.0, 0.0), 15: (1.5, 2.5), 20: (2.0, 5.0), 30: (3.0, 5.0), 100: (3.0, 5.0)}
    for _ in range(101):
        if renorm.steps_done in expected:
            assert renorm.clipping_limits() == pytest.approx(expected[renorm.steps_done])
        renorm.advance_schedule()


def test_renormalized_output_follows_the_paper_formula():
    renorm = BatchRenorm2d(3, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0,
                           dtype=torch.float64)
    _random_affine(renorm)
    running_mean = torch.tensor([0.0, 2.0, -3.0], dtype=torch.float64)
    running_var = torch.tensor([1.0, 0.1, 9.0], dtype=torch.float64)
    renorm.running_mean.copy_(running_mean)
    renorm.running_var.copy_(running_var)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch_var, batch_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    batch_std = (batch_var + renorm.eps).sqrt()
    running_std = (running_var + renorm.eps).sqrt()
    r = (batch_std / running_std).clamp(1 / 1.5, 1.5)
    d = ((batch_mean - running_mean) / running_std).clamp(-0.5, 0.5)
    assert (r != 1).any() and (d != 0).any()
    x_hat = (x - batch_mean.view(1, -1, 1, 1)) / batch_std.view(1, -1, 1, 1)
    expected = (x_hat * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)) * renorm.weight.view(1, -1, 1, 1) \
        + renorm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(renorm(x), expected, rtol=1e-12, atol=1e-12)
    n = x.numel() // 3
    torch.testing.assert_close(renorm.running_var, 0.9 * running_var + 0.1 * batch_var * n / (n - 1))


def test_brn_normalizer_replaces_every_batchnorm_and_advances_the_schedule():
    model = build_model("test_resnet", "brn", num_classes=10, in_chans=1, warmup_steps=2)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert layers and all(isinstance(m, BatchRenorm2d) for m in layers)
    model.normalizer.after_step(model)
    assert {m.steps_done for m in layers} == {1}
