"""The normalizer contract and the BatchNorm-replacement walk every normalizer shares.

A normalizer turns a timm model built with BatchNorm into one that normalizes its own way. It is applied
after ``timm.create_model`` so that it works on any family whose norms are ``nn.BatchNorm2d`` (including
timm's fused ``BatchNormAct2d``), not only the families whose entrypoints accept ``norm_layer``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from repro.errors import UserError
from repro.registry import Registry


class Normalizer:
    """Base class: ``apply`` converts a model; the trainer calls ``param_groups`` and ``after_step``.

    Subclasses take their options as keyword arguments of ``__init__``; unknown options are a user error.
    """

    name: ClassVar[str] = ""
    #: True when the converted model keeps batch statistics that test-time adaptation can re-estimate.
    has_batch_statistics: ClassVar[bool] = False
    #: True when one forward over a whole batch with per-micro-batch ("ghost") BatchNorm statistics computes exactly
    #: what separate micro-batch passes compute (``repro.norms.ghost``): the trainer then takes the one-pass path.
    micro_batches_in_one_pass: ClassVar[bool] = False
    #: Grid keys that cannot change this normalizer's numbers. A suite runs one value of such an axis and reports
    #: the record for every value (``repro.suite.expand``, ``RunSpec.shared_with``). Per-sample normalization, or
    #: none, makes ``train.micro_batch`` one: split or not, every image is normalized alike, the gradient is the
    #: batch mean, and the trainer's one-pass path runs the very same forward whatever the micro-batch.
    invariant_to: ClassVar[frozenset[str]] = frozenset()

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; the default is one group with the base learning rate."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]

    def before_training(self, model: nn.Module, steps_per_epoch: int) -> None:
        """Called once before the first optimizer step (CBN turns a burn-in given in epochs into steps here)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (MimicNorm projects its weights here)."""

    def step_pattern(self, steps_per_epoch: int) -> tuple[int, int]:
        """``(first, period)``: from step ``first`` on, the training steps' operations repeat every ``period``
        steps (``repro.train.operations`` counts them without a device). Step 0 differs everywhere: SGD creates its
        momentum buffers."""
        return 1, 1

    def options(self) -> dict[str, Any]:
        """The options this instance was built with, for run records."""
        return dict(getattr(self, "_options", {}))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class PerSampleNormalizer(Normalizer):
    """A normalizer that normalizes each image alone (or not at all): invariant to ``train.micro_batch``, and its
    micro-batches are exact in one pass."""

    micro_batches_in_one_pass = True
    invariant_to = frozenset({"train.micro_batch"})


NORMALIZERS: Registry[type[Normalizer]] = Registry("normalizer")


def register_normalizer(name: str) -> Callable[[type[Normalizer]], type[Normalizer]]:
    """Class decorator: register a Normalizer subclass under ``name`` and record its options for run records."""

    def decorator(cls: type[Normalizer]) -> type[Normalizer]:
        original_init = cls.__init__

        def __init__(self: Normalizer, *args: Any, **kwargs: Any) -> None:
            bound = inspect.signature(original_init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._options = {k: v for k, v in bound.arguments.items() if k != "self"}
            original_init(self, *args, **kwargs)

        __init__.__signature__ = inspect.signature(original_init)  # type: ignore[attr-defined]
        __init__.__doc__ = original_init.__doc__
        cls.__init__ = __init__  # type: ignore[method-assign]
        return NORMALIZERS.register_named(name)(cls)

    return decorator


def normalizer_options(cls: type[Normalizer]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


NormalizerSpec = str | type[Normalizer] | Callable[..., Normalizer] | Normalizer


def create_normalizer(spec: NormalizerSpec, **options: Any) -> Normalizer:
    """Build a normalizer from a registered name, a class, a ``functools.partial`` of a class, or an instance."""
    if isinstance(spec, Normalizer):
        if options:
            raise TypeError("options cannot be given together with a normalizer instance")
        return spec
    factory = NORMALIZERS.get(spec) if isinstance(spec, str) else spec
    try:
        return factory(**options)
    except TypeError as err:
        cls = getattr(factory, "func", factory)
        allowed = normalizer_options(cls) if isinstance(cls, type) else []
        name = getattr(cls, "name", "") or getattr(cls, "__name__", str(cls))
        raise UserError(f"normalizer {name!r}: bad options {sorted(options)} ({err}); allowed: {allowed}") from None


def batchnorm_modules(model: nn.Module) -> Iterator[tuple[str, nn.BatchNorm2d]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_batchnorms(model: nn.Module, make: Callable[[str, nn.BatchNorm2d], nn.Module]) -> int:
    """Replace every ``BatchNorm2d`` by ``make(name, bn)``; a fused timm ``BatchNormAct2d`` keeps its activation.

    Returns how many layers were replaced.
    """
    targets = list(batchnorm_modules(model))
    for name, bn in targets:
        new = make(name, bn)
        if isinstance(bn, BatchNormAct2d):
            new = nn.Sequential(new, bn.drop, bn.act)
        set_submodule(model, name, new)
    return len(targets)


def copy_affine(source: nn.BatchNorm2d, target: nn.Module) -> None:
    """Carry the BN's affine init (e.g. timm's zero-init of the last norm in a block) over to its replacement."""
    if source.affine and getattr(target, "weight", None) is not None:
        with torch.no_grad():
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)


def running_average_factor(bn: nn.BatchNorm2d) -> float:
    """Count one training batch and return its weight in the running averages, exactly as ``nn.BatchNorm2d`` does.

    For BatchNorm variants that update their running statistics themselves; ``momentum=None`` is a cumulative average.
    """
    bn.num_batches_tracked.add_(1)
    return 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum


def _momentum_factors(bn: nn.modules.batchnorm._BatchNorm, groups: int) -> tuple[float, ...]:
    """Each group's weight in the running averages: the momentum, or 1/(batches tracked) for ``momentum=None``."""
    if bn.momentum is not None:
        return (bn.momentum,) * groups
    done = int(bn.num_batches_tracked.item())  # the cumulative average reads its count, as BatchNorm itself does
    return tuple(1.0 / (done + g + 1) for g in range(groups))


@functools.lru_cache(maxsize=64)
def _in_order_coefficients(factors: tuple[float, ...], dtype: torch.dtype, device: torch.device
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` (G + 1, 1) and ``weights`` (G + 1, G) of the closed form, built on the host once per momentum and
    group count and kept on the device: a tensor made from Python numbers in the step would be a blocking copy."""
    keep, weights = [1.0], [[0.0] * len(factors)]
    for g, factor in enumerate(factors):
        keep.append(keep[-1] * (1.0 - factor))
        weights.append([w * (1.0 - factor) for w in weights[-1]])
        weights[-1][g] = factor
    return (torch.tensor(keep, dtype=dtype, device=device).unsqueeze(1),
            torch.tensor(weights, dtype=dtype, device=device))


@torch.no_grad()
def running_statistics_in_order(bn: nn.modules.batchnorm._BatchNorm, means: torch.Tensor, variances: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the G groups' momentum updates in order; return the running mean and variance before each update and
    after the last, ``(G + 1, C)``, in closed form: state_g = r·Π_{h<g}(1−f_h) + Σ_{h<g} f_h·Π_{h<j<g}(1−f_j)·s_h.

    ``f_h`` is the momentum, or 1/(batches tracked) for ``momentum=None`` (a cumulative average), as in BatchNorm.
    """
    keep, weights = _in_order_coefficients(_momentum_factors(bn, means.shape[0]), means.dtype, means.device)
    running_means = keep * bn.running_mean.to(means.dtype) + weights @ means
    running_vars = keep * bn.running_var.to(means.dtype) + weights @ variances
    bn.num_batches_tracked.add_(means.shape[0])
    bn.running_mean.copy_(running_means[-1])
    bn.running_var.copy_(running_vars[-1])
    return running_means, running_vars


@torch.no_grad()
def update_running_statistics_in_order(bn: nn.modules.batchnorm._BatchNorm, means: torch.Tensor,
                                       biased_variances: torch.Tensor, values_per_group: int) -> None:
    """The last state of ``running_statistics_in_order``, written in place: two kernels for G groups' updates.

    ``biased_variances`` (G, C) are corrected to unbiased ones (``values_per_group`` values per channel), as BatchNorm
    stores them.
    """
    factors = _momentum_factors(bn, means.shape[0])
    _, weights = _in_order_coefficients(factors, bn.running_mean.dtype, bn.running_mean.device)
    final_keep, final_weights = math.prod(1.0 - f for f in factors), weights[-1]
    bessel = values_per_group / (values_per_group - 1)
    bn.running_mean.addmv_(means.t().to(bn.running_mean.dtype), final_weights, beta=final_keep)
    bn.running_var.addmv_(biased_variances.t().to(bn.running_var.dtype), final_weights, beta=final_keep, alpha=bessel)
    bn.num_batches_tracked.add_(means.shape[0])


def channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W) in at least float32, differentiable.

    On CPU the centered two-pass form, stable and faster there than ``torch.var_mean`` over non-contiguous
    dimensions; elsewhere ``torch.var_mean`` (Welford's, as stable), one kernel where the two-pass form is four.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        return mean, var
    mean = x.mean((0, 2, 3))
    return mean, (x - mean.view(1, -1, 1, 1)).square().mean((0, 2, 3))


def conv_feeding_each_batchnorm(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Map each BatchNorm2d's name to the conv whose output it normalizes, found by one small eval forward.

    Tracing the tensors (not the module order) makes this independent of how a timm family names its layers.
    A BatchNorm not fed directly by a conv (pre-activation layouts) is missing from the result.
    """
    outputs: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    fed: dict[str, nn.Conv2d] = {}

    def remember_output(conv: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        outputs[id(output)] = (conv, output)  # the tensor is kept alive so its id cannot be reused

    def make_lookup(name: str):
        def lookup(_bn: nn.Module, inputs: tuple) -> None:
            conv, tensor = outputs.get(id(inputs[0]), (None, None))
            if tensor is inputs[0]:
                fed[name] = conv

        return lookup

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [conv.register_forward_hook(remember_output) for conv in convs]
    handles += [bn.register_forward_pre_hook(make_lookup(name)) for name, bn in batchnorm_modules(model)]
    probe_forward(model, handles)
    return fed


def probe_forward(model: nn.Module, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """One small eval forward of a zero image through ``model`` for its tracing hooks, which are removed after.

    Nothing runs for a model without a conv (no input shape to probe with)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    size = max(32, *getattr(model, "pretrained_cfg", {}).get("min_input_size", (0, 0, 0))[1:])
    was_training = model.training
    try:
        if convs:
            model.eval()
            model(convs[0].weight.new_zeros(1, convs[0].in_channels, size, size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
