"""Fixed-point BatchNorm for deployment, after Lin et al. 2020 (arXiv 2008.13128; no official code).

The paper converts BN's per-channel affine map of two floats into "a fixed-point operation with shared quantized
scale". Its tables could not be read, so the scheme below is built from that description and standard
fixed-point arithmetic; no number of the paper is reproduced.

Scheme, per BN layer with B-bit activations (``bits``) and per-tensor scales ``s_x`` (input) and ``s_y``
(output), calibrated as max|x| / (2^(B-1) - 1) and max|y| / (2^(B-1) - 1) on calibration images:

* eval-mode BN is ``y = a*x + b`` per channel c, ``a = gamma/sqrt(var + eps)``, ``b = beta - a*mean``;
* input ``q_x = clamp(round(x / s_x))`` (a B-bit integer, int32 tensor) -- the float/integer boundary that a
  fully quantized network would place in the previous layer's requantization;
* integer multiply-add with one shared power-of-two scale ``2^-S`` per layer:
  ``q_y = clamp((M_c * q_x + C_c + 2^(S-1)) >> S)`` with ``M_c = round(a_c s_x / s_y * 2^S)`` (a signed
  ``multiplier_bits`` integer) and ``C_c = round(b_c / s_y * 2^S)``; ``>>`` is an arithmetic shift, so the
  ``+2^(S-1)`` makes it round half up. ``S`` is the largest shift for which every ``M_c`` fits in
  ``multiplier_bits`` and the accumulator cannot overflow: int32 when ``bits + multiplier_bits <= 31`` (the
  default 8-bit case), else int64. ``C_c`` of a channel that always saturates is clipped to where clipping
  cannot change the output. No float enters this step (``forward_int``);
* output ``y = s_y * q_y`` (back to float for the next float layer).

Error bound, in output LSB (units of ``s_y``), against the exact float BN applied to the same quantized input,
``t = (a s_x q_x + b) / s_y``: the multiplier and bias are each within ``2^-(S+1)`` of their exact values and
``|q_x| <= 2^(B-1)``, so before rounding the error is at most ``delta = (2^(B-1) + 1) / 2^(S+1)``; rounding adds
at most 1/2 and saturation (applied to both) does not increase it. Hence ``|q_y - t| <= 1/2 + delta`` and
``q_y`` is never more than 1 LSB from ``t`` rounded (for ``delta < 1``). With the default multiplier widths
``S`` is typically 13-14 at 8 bits and 29-30 at 16 bits, so ``delta`` is below 0.01 and 0.0001 LSB
(``QuantizedBatchNorm2d.error_bound_lsb`` states the bound per layer; ``measure_qbn`` measures the error).

Design: the registered ``qbn`` normalizer trains as plain BatchNorm (its ``apply`` changes nothing), because the
conversion is post-training: it needs the trained running statistics and calibration images, which do not exist
when the model is built. ``QuantizedBN.convert`` (or ``convert_to_qbn``) then returns the integer-BN copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from repro.errors import UserError
from repro.norms.base import Normalizer, batchnorm_modules, register_normalizer, replace_batchnorms


def resolve_bit_widths(bits: int, multiplier_bits: int | None) -> tuple[int, int]:
    """Activation and multiplier bit widths; the multipliers default to twice the activation width."""
    multiplier_bits = multiplier_bits or 2 * bits
    if not 2 <= bits <= 16 or not 2 <= multiplier_bits <= 32:
        raise UserError(f"qbn: bits must be in 2..16 and multiplier_bits in 2..32, got {bits} and {multiplier_bits}")
    return bits, multiplier_bits


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``a*x + b`` per channel, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise UserError("qbn: a BatchNorm without running statistics cannot be converted")
    a = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        a = a * bn.weight.detach().double()
    b = -a * bn.running_mean.double()
    if bn.affine:
        b = b + bn.bias.detach().double()
    return a, b


class QuantizedBatchNorm2d(nn.Module):
    """Integer BN: ``q_y = clamp((M * q_x + C + 2^(S-1)) >> S)`` per channel, one shift ``S`` per layer."""

    def __init__(self, multiplier: torch.Tensor, bias: torch.Tensor, shift: int, input_scale: float,
                 output_scale: float, bits: int) -> None:
        super().__init__()
        self.register_buffer("multiplier", multiplier)
        self.register_buffer("bias", bias)  # C + 2^(S-1): the rounding offset is folded in
        self.shift = shift
        self.input_scale = input_scale
        self.output_scale = output_scale
        self.bits = bits
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, input_scale: float, output_scale: float, bits: int,
                       multiplier_bits: int) -> QuantizedBatchNorm2d:
        """Quantize ``bn`` for the given activation scales, with the largest shift that fits (module docstring)."""
        a, b = batchnorm_affine(bn)
        ratio, offset = (a * input_scale / output_scale).tolist(), (b / output_scale).tolist()
        accumulator_bits = 32 if bits + multiplier_bits <= 31 else 64
        input_limit = 2 ** (bits - 1)
        for shift in range(accumulator_bits - 2, 0, -1):
            # float64 * 2^shift is exact, so round() gives the exact nearest integers
            multipliers = [round(r * 2**shift) for r in ratio]
            saturated = [abs(m) * input_limit + (input_limit + 1) * 2**shift for m in multipliers]
            biases = [max(-s, min(s, round(o * 2**shift))) for o, s in zip(offset, saturated, strict=True)]
            largest_accumulator = max(abs(m) * input_limit + abs(c) for m, c in zip(multipliers, biases, strict=True))
            if (max(map(abs, multipliers)) < 2 ** (multiplier_bits - 1)
                    and largest_accumulator + 2**shift < 2 ** (accumulator_bits - 1)):
                break
        else:
            raise UserError(f"qbn: no shift represents this BN with {multiplier_bits}-bit multipliers "
                            f"(largest a*s_x/s_y = {max(map(abs, ratio)):.3g})")
        integer = {"dtype": torch.int32 if accumulator_bits == 32 else torch.int64, "device": bn.running_mean.device}
        return cls(torch.tensor(multipliers, **integer), torch.tensor(biases, **integer) + 2 ** (shift - 1),
                   shift, input_scale, output_scale, bits)

    @property
    def error_bound_lsb(self) -> float:
        """Largest possible |q_y - exact float BN output| in output LSB, for this layer's shift."""
        return 0.5 + (2 ** (self.bits - 1) + 1) / 2 ** (self.shift + 1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.input_scale).clamp_(self.qmin, self.qmax).to(torch.int32)

    def forward_int(self, q_x: torch.Tensor) -> torch.Tensor:
        """The BN on integers only: int32 in, int32 out, accumulation in the multiplier's dtype."""
        if q_x.is_floating_point():
            raise TypeError(f"forward_int takes integer tensors, got {q_x.dtype}")
        shape = (1, -1) + (1,) * (q_x.ndim - 2)
        accumulator = q_x.to(self.multiplier.dtype) * self.multiplier.view(shape) + self.bias.view(shape)
        return (accumulator >> self.shift).clamp_(self.qmin, self.qmax).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_int(self.quantize_input(x)).to(x.dtype) * self.output_scale

    def extra_repr(self) -> str:
        return (f"{len(self.multiplier)}, bits={self.bits}, shift={self.shift}, "
                f"accumulator={self.multiplier.dtype}, s_x={self.input_scale:.4g}, s_y={self.output_scale:.4g}")


@torch.no_grad()
def calibrate_ranges(model: nn.Module, calibration_batches: Iterable[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Largest |input| and |eval-mode BN output| of every BatchNorm2d over the calibration images."""
    ranges: dict[str, list[float]] = {}

    def make_hook(name: str, bn: nn.BatchNorm2d):
        a, b = (t.float().view(1, -1, 1, 1) for t in batchnorm_affine(bn))

        def record(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].float()
            seen = ranges.setdefault(name, [0.0, 0.0])
            seen[0] = max(seen[0], x.abs().max().item())
            seen[1] = max(seen[1], (a * x + b).abs().max().item())

        return record

    handles = [bn.register_forward_pre_hook(make_hook(name, bn)) for name, bn in batchnorm_modules(model)]
    try:
        model.eval()
        for images in calibration_batches:
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (x_max, y_max) for name, (x_max, y_max) in ranges.items()}


def convert_to_qbn(model: nn.Module, calibration_batches: Iterable[torch.Tensor], bits: int = 8,
                   multiplier_bits: int | None = None) -> nn.Module:
    """A copy of a trained BN model (eval mode) whose every BatchNorm2d is a ``QuantizedBatchNorm2d``.

    Args:
        model: the trained float model; it is not modified.
        calibration_batches: normalized input batches that set each layer's activation scales.
        bits: activation bit width (8 or 16; 2 to 16 work).
        multiplier_bits: bit width of the per-channel multipliers, ``2 * bits`` by default.
    """
    bits, multiplier_bits = resolve_bit_widths(bits, multiplier_bits)
    quantized = copy.deepcopy(model).eval()
    ranges = calibrate_ranges(quantized, calibration_batches)
    levels = 2 ** (bits - 1) - 1

    def quantize(name: str, bn: nn.BatchNorm2d) -> QuantizedBatchNorm2d:
        if name not in ranges:
            raise UserError(f"qbn: BatchNorm {name} saw no calibration input")
        x_max, y_max = ranges[name]
        tiny = torch.finfo(torch.float32).tiny  # an all-zero layer still gets a valid scale
        return QuantizedBatchNorm2d.from_batchnorm(bn, max(x_max, tiny) / levels, max(y_max, tiny) / levels, bits,
                                                   multiplier_bits)

    replace_batchnorms(quantized, quantize)
    return quantized


class FloatingPointSpy(TorchFunctionMode):
    """Records every torch call that receives or returns a floating-point tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.float_calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in (*args, *(kwargs or {}).values(), result) if isinstance(t, torch.Tensor)]
        if any(t.is_floating_point() for t in tensors):
            self.float_calls.append(getattr(func, "__name__", str(func)))
        return result


@torch.no_grad()
def float_operations_in_integer_path(qbn_model: nn.Module, images: torch.Tensor) -> list[str]:
    """What is not integer in the integer step of every ``QuantizedBatchNorm2d``, on one forward of ``images``.

    Empty when the deployment path is integer-only: integer multipliers and biases, and no torch call inside
    ``forward_int`` that takes or returns a float tensor (the quantize/dequantize boundary is outside it).
    """
    found: list[str] = []

    def make_spy(name: str, qbn: QuantizedBatchNorm2d):
        def spy_on_integer_step(_module: nn.Module, inputs: tuple) -> None:
            q_x = qbn.quantize_input(inputs[0])
            with FloatingPointSpy() as spy:
                q_y = qbn.forward_int(q_x)
            found.extend(f"{name}: {call}" for call in spy.float_calls)
            if q_y.is_floating_point():
                found.append(f"{name}: output is {q_y.dtype}")

        return spy_on_integer_step

    layers = [(name, m) for name, m in qbn_model.named_modules() if isinstance(m, QuantizedBatchNorm2d)]
    for name, qbn in layers:
        found.extend(f"{name}.{buffer}: {getattr(qbn, buffer).dtype}" for buffer in ("multiplier", "bias")
                     if getattr(qbn, buffer).is_floating_point())
    handles = [qbn.register_forward_pre_hook(make_spy(name, qbn)) for name, qbn in layers]
    try:
        qbn_model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclass(frozen=True)
class LayerError:
    """Integer BN vs float BN on one layer, in output LSB, over every output element measured."""

    max_error_lsb: float  # largest |q_y - t|, t = float BN on the same quantized input, in units of s_y
    bound_lsb: float  # the analysis' bound 1/2 + delta for this layer's shift
    mismatch_fraction: float  # fraction of outputs differing from round-half-up(t)
    shift: int


@dataclass(frozen=True)
class QBNReport:
    layers: dict[str, LayerError]
    top1_float: float
    top1_quantized: float
    flipped_predictions: int
    images: int

    @property
    def top1_change(self) -> float:
        return self.top1_quantized - self.top1_float

    @property
    def max_error_lsb(self) -> float:
        return max(layer.max_error_lsb for layer in self.layers.values())


def _quantized_layer(model: nn.Module, name: str) -> QuantizedBatchNorm2d:
    module = model.get_submodule(name)
    return module[0] if isinstance(module, nn.Sequential) else module  # a fused norm-act keeps its activation


@torch.no_grad()
def measure_qbn(float_model: nn.Module, qbn_model: nn.Module,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> QBNReport:
    """Per-layer error of the integer BN against the original float BN, and the top-1 change, on ``batches``.

    Each layer is measured on the quantized inputs it actually receives in ``qbn_model``; the float reference
    is the original ``nn.BatchNorm2d`` evaluated in float64 on the dequantized input ``s_x * q_x``.
    """
    stats: dict[str, list[float]] = {}

    def make_hook(name: str, bn: nn.BatchNorm2d, qbn: QuantizedBatchNorm2d):
        stat = stats.setdefault(name, [0.0, 0, 0])  # max error, mismatches, outputs

        def compare(_module: nn.Module, inputs: tuple) -> None:
            q_x = qbn.quantize_input(inputs[0])
            q_y = qbn.forward_int(q_x).double()
            reference = F.batch_norm(q_x.double() * qbn.input_scale, bn.running_mean.double(),
                                     bn.running_var.double(), None if bn.weight is None else bn.weight.double(),
                                     None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
            exact = (reference / qbn.output_scale).clamp(qbn.qmin, qbn.qmax)
            stat[0] = max(stat[0], (q_y - exact).abs().max().item())
            stat[1] += (q_y != torch.floor(exact + 0.5)).sum().item()
            stat[2] += q_y.numel()

        return compare

    layers = {name: (bn, _quantized_layer(qbn_model, name)) for name, bn in batchnorm_modules(float_model)}
    handles = [qbn.register_forward_pre_hook(make_hook(name, bn, qbn)) for name, (bn, qbn) in layers.items()]
    float_model.eval()
    qbn_model.eval()
    correct_float = correct_quantized = flipped = count = 0
    try:
        for images, labels in batches:
            predicted_float = float_model(images).argmax(1)
            predicted_quantized = qbn_model(images).argmax(1)
            correct_float += (predicted_float == labels).sum().item()
            correct_quantized += (predicted_quantized == labels).sum().item()
            flipped += (predicted_float != predicted_quantized).sum().item()
            count += len(labels)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = {
        name: LayerError(stats[name][0], qbn.error_bound_lsb, stats[name][1] / stats[name][2], qbn.shift)
        for name, (_, qbn) in layers.items()
    }
    return QBNReport(per_layer, 100 * correct_float / count, 100 * correct_quantized / count, flipped, count)


@register_normalizer("qbn")
class QuantizedBN(Normalizer):
    """Trains as plain BatchNorm; ``convert`` makes the fixed-point deployment copy after training."""

    has_batch_statistics = True

    def __init__(self, bits: int = 8, multiplier_bits: int | None = None) -> None:
        """
        Args:
            bits: activation bit width of the converted BN (8 or 16).
            multiplier_bits: bit width of the per-channel integer multipliers; ``2 * bits`` by default.
        """
        self.bits, self.multiplier_bits = resolve_bit_widths(bits, multiplier_bits)

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def convert(self, model: nn.Module, calibration_batches: Iterable[torch.Tensor]) -> nn.Module:
        return convert_to_qbn(model, calibration_batches, self.bits, self.multiplier_bits)
