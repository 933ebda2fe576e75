"""The ``quantize`` task: a trained BN model converted to fixed-point BN (``repro.norms.qbn``) and measured.

The model comes from ``train_or_load``, so a suite with the BN recipe of another (``qbn-fmnist`` and
``fmnist-normalizers``) converts the models that suite trained instead of training them again.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from repro.data import make_loader
from repro.errors import UserError
from repro.norms.qbn import convert_to_qbn, float_operations_in_integer_path, measure_qbn
from repro.tasks.base import RunContext, RunOutcome, RunSpec, Task, register_task, train_or_load


class QuantizeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int = Field(default=8, ge=2, le=16, description="activation bit width of the integer BN")
    multiplier_bits: int | None = Field(default=None, ge=2, le=32, description="None: twice the activation width")
    calibration_images: int = Field(
        default=1000, ge=1, description="training images (not augmented) whose ranges set each layer's scales")


@register_task("quantize")
class QuantizeTask(Task):
    """Float vs integer-BN top-1 on the test split, the largest error in output LSB, and the integer-only check."""

    Options = QuantizeOptions
    table_metrics = ("top1_float", "top1_quantized", "top1_change", "flipped_pct", "max_error_lsb", "error_bound_lsb",
                     "layers_over_bound", "max_layer_mismatch_pct", "integer_only")

    def run(self, run: RunSpec, ctx: RunContext) -> RunOutcome:
        start = time.perf_counter()
        options: QuantizeOptions = run.typed_config.task_options
        trained = train_or_load(run, ctx)
        if trained.status != "ok":
            return RunOutcome(trained.status, trained.metrics, time.perf_counter() - start,
                              diverged_step=trained.result.diverged_step if trained.result else None)
        model, data = trained.model.eval(), trained.data
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            raise UserError(f"suite {run.suite}: task quantize: normalizer {run.typed_config.normalizer.name!r} "
                            "leaves no BatchNorm2d to quantize; allowed: bn, qbn")
        loader_args = {"device": ctx.device, "mean": data.mean, "std": data.std}
        batch_size = run.typed_config.train.eval_batch_size
        calibration = [images for images, _ in make_loader(data.train.subset(options.calibration_images), batch_size,
                                                           **loader_args)]
        quantized = convert_to_qbn(model, calibration, options.bits, options.multiplier_bits)
        report = measure_qbn(model, quantized, make_loader(data.test, batch_size, **loader_args))
        float_operations = float_operations_in_integer_path(quantized, calibration[0])
        layers = report.layers.values()
        metrics = {
            "top1_float": report.top1_float, "top1_quantized": report.top1_quantized, "top1_change": report.top1_change,
            "flipped_pct": 100 * report.flipped_predictions / report.images,
            "max_error_lsb": report.max_error_lsb, "error_bound_lsb": max(layer.bound_lsb for layer in layers),
            "layers_over_bound": sum(layer.max_error_lsb > layer.bound_lsb for layer in layers),
            "max_layer_mismatch_pct": 100 * max(layer.mismatch_fraction for layer in layers),
            "integer_only": float(not float_operations), "min_shift": min(layer.shift for layer in layers),
        }
        extra = {
            **trained.training_extra, "from_checkpoint": trained.from_checkpoint, "training_metrics": trained.metrics,
            "float_operations": float_operations[:10], "test_images": report.images,
            "layers": {name: vars(layer) for name, layer in report.layers.items()},
        }
        return RunOutcome("ok", metrics, time.perf_counter() - start, extra=extra)
