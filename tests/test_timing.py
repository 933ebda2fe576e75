"""Step timing runs the normalizer's hooks, so CBN is timed on its cross-iteration path."""

import torch

from repro.models import build_model
from repro.norms.cbn import CrossIterationBatchNorm2d
from repro.train.timing import measure_step_time

torch.set_num_threads(1)


def test_step_timing_runs_the_cross_iteration_path():
    model = build_model("test_resnet", "cbn", num_classes=10, in_chans=1, window=2)
    timing = measure_step_time(model, batch_size=8, image_size=28, in_chans=1, num_classes=10, steps=2, warmup=2)
    assert timing.steps == 2 and timing.threads == 1 and 0 < timing.min_ms <= timing.median_ms
    assert timing.median_cpu_ms > 0
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert {m.iterations_done for m in layers} == {4}
    assert all(len(m.compensated_past_statistics()[0]) == 1 for m in layers)
