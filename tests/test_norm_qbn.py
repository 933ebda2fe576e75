"""Fixed-point BN: integer-only arithmetic, the error bound of the scheme's analysis, top-1 after conversion."""

import math

import pytest
import torch
from torch import nn

from repro.data import make_loader
from repro.errors import UserError
from repro.models import build_model
from repro.norms.qbn import (
    FloatingPointSpy,
    QuantizedBatchNorm2d,
    convert_to_qbn,
    float_operations_in_integer_path,
    measure_qbn,
)
from repro.train import TrainConfig, seed_everything, train_and_evaluate

torch.set_num_threads(1)

CPU = torch.device("cpu")


def analysis_bound_lsb(bits: int, shift: int) -> float:
    """|q_y - t| <= 1/2 + (2^(B-1) + 1) / 2^(S+1): rounding plus multiplier and bias representation error."""
    return 0.5 + (2 ** (bits - 1) + 1) / 2 ** (shift + 1)


def example_batchnorm() -> nn.BatchNorm2d:
    """Channels covering the cases: ordinary, negative and zero gamma, and one that always saturates."""
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -1.0, 0.0, 2.0, 0.1]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.01, 3.0]))
        bn.weight.copy_(torch.tensor([1.3, -0.7, 0.0, 0.2, 0.9]))
        bn.bias.copy_(torch.tensor([0.1, 0.5, -0.2, 0.0, 5000.0]))
    return bn


@pytest.mark.parametrize("bits", [8, 16])
def test_integer_path_uses_integers_only(bits):
    qbn = QuantizedBatchNorm2d.from_batchnorm(example_batchnorm(), 0.05, 0.04, bits, 2 * bits)
    expected_accumulator = torch.int32 if bits + 2 * bits <= 31 else torch.int64  # the scheme's rule
    assert qbn.multiplier.dtype == qbn.bias.dtype == expected_accumulator
    q_x = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (2, 5, 4, 4), dtype=torch.int32)
    with FloatingPointSpy() as spy:
        q_y = qbn.forward_int(q_x)
    assert spy.float_calls == []
    assert q_y.dtype == torch.int32
    assert q_y.min() >= -(2 ** (bits - 1)) and q_y.max() <= 2 ** (bits - 1) - 1
    with pytest.raises(TypeError, match="integer"):
        qbn.forward_int(q_x.float())


@pytest.mark.parametrize("bits", [8, 16])
def test_every_representable_input_is_within_the_bound(bits):
    """All 2^B input codes on every channel, against BN's float64 definition on the dequantized input."""
    bn = example_batchnorm()
    input_scale, output_scale = 0.05, 0.04
    qbn = QuantizedBatchNorm2d.from_batchnorm(bn, input_scale, output_scale, bits, 2 * bits)
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int32)
    q_x = codes.view(1, 1, -1, 1).expand(1, 5, -1, 1).contiguous()
    q_y = qbn.forward_int(q_x).double()
    shape = (1, 5, 1, 1)
    mean, var = bn.running_mean.double().view(shape), bn.running_var.double().view(shape)
    gamma, beta = bn.weight.detach().double().view(shape), bn.bias.detach().double().view(shape)
    exact = (gamma * (q_x.double() * input_scale - mean) / torch.sqrt(var + bn.eps) + beta) / output_scale
    exact = exact.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    bound = analysis_bound_lsb(bits, qbn.shift)
    assert bound < 1
    assert (q_y - exact).abs().max().item() <= bound
    assert (q_y - torch.floor(exact + 0.5)).abs().max().item() <= 1
    assert (q_y[0, 4] == 2 ** (bits - 1) - 1).all()  # the saturated channel


@pytest.fixture(scope="module")
def trained_bn_model(fashion_mnist):
    """timm's tiny EfficientNet (fused BN-act layers, depthwise convs), one epoch on 2048 Fashion-MNIST images."""
    seed_everything(0)
    model = build_model("test_efficientnet", "qbn", num_classes=10, in_chans=1, small_input=True)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, eval_batch_size=500)
    data = fashion_mnist.subset(2048, 500)
    result = train_and_evaluate(model, data, config, device=CPU, seed=0, progress=False)
    assert result.status == "ok"
    return model.eval(), data


@pytest.mark.parametrize("bits", [8, 16])
def test_trained_model_conversion(trained_bn_model, bits):
    model, data = trained_bn_model
    loader_args = {"device": CPU, "mean": data.mean, "std": data.std}
    calibration = [images for images, _ in make_loader(data.train.subset(256), 128, **loader_args)]
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = model.normalizer.__class__(bits=bits).convert(model, calibration)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batchnorms  # the float model is untouched
    assert sum(isinstance(m, QuantizedBatchNorm2d) for m in converted.modules()) == batchnorms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    report = measure_qbn(model, converted, make_loader(data.test, 250, **loader_args))
    assert len(report.layers) == batchnorms
    for layer in report.layers.values():
        assert layer.max_error_lsb <= analysis_bound_lsb(bits, layer.shift) <= 1
    assert report.top1_float > 2 * 100 / data.num_classes  # well above chance, so a top-1 change means something
    # quantization must not move top-1 by more than the sampling error of top-1 itself on this split
    p = report.top1_float / 100
    standard_error = 100 * math.sqrt(p * (1 - p) / report.images)
    assert abs(report.top1_change) <= standard_error


def test_integer_only_check_finds_a_float_in_the_integer_step(trained_bn_model):
    model, data = trained_bn_model
    images, _ = next(iter(make_loader(data.test.subset(8), 8, device=CPU, mean=data.mean, std=data.std)))
    converted = convert_to_qbn(model, [images], bits=8)
    assert float_operations_in_integer_path(converted, images) == []
    name, layer = next((n, m) for n, m in converted.named_modules() if isinstance(m, QuantizedBatchNorm2d))
    integer_step = layer.forward_int
    layer.forward_int = lambda q_x: integer_step((q_x.float() * 1.0).round().int())  # a detour through floats
    found = float_operations_in_integer_path(converted, images)
    assert found and all(entry.startswith(f"{name}: ") for entry in found)


def test_qbn_trains_as_batchnorm():
    """Conversion is post-training: the registered normalizer leaves timm's BatchNorm model as it is."""
    torch.manual_seed(0)
    bn_model = build_model("resnet18", "bn", num_classes=10, in_chans=1, small_input=True)
    torch.manual_seed(0)
    qbn_model = build_model("resnet18", "qbn", num_classes=10, in_chans=1, small_input=True)
    assert [type(m) for m in qbn_model.modules()] == [type(m) for m in bn_model.modules()]
    for (name, a), (_, b) in zip(bn_model.state_dict().items(), qbn_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert qbn_model.normalizer.has_batch_statistics


def test_bad_bit_widths_are_user_errors():
    with pytest.raises(UserError, match="bits"):
        build_model("resnet18", "qbn", num_classes=10, bits=32)
    with pytest.raises(UserError, match="multiplier_bits"):
        convert_to_qbn(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), [torch.zeros(1, 1, 2, 2)],
                       bits=8, multiplier_bits=40)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_layer_lives_on_the_batchnorms_device():
    """A CUDA model converts to integer BN on CUDA (the first H200 window found the buffers left on the CPU)."""
    bn = example_batchnorm().cuda()
    qbn = QuantizedBatchNorm2d.from_batchnorm(bn, 0.05, 0.05, 8, 16)
    assert qbn.multiplier.is_cuda and qbn.bias.is_cuda
    assert qbn(torch.randn(2, 5, 4, 4, device="cuda")).is_cuda
