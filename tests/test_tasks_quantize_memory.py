"""The quantize and memory tasks through the runner, on a tiny generated suite; the CPU peak-memory window."""

import textwrap
from pathlib import Path

import pytest
import torch

from repro.errors import UserError
from repro.execute import run_suite
from repro.store.records import iter_records
from repro.train.timing import reset_peak_memory, window_peak_memory_mb
from tests.conftest import computed_fields

torch.set_num_threads(1)

CPU = torch.device("cpu")

SUITE = """
name: {name}
version: 1
description: a tiny suite for tests
citation: none
task: {task}
task_options: {options}
dataset: {{name: fashion_mnist, train_subset: 192, test_subset: 64, generated: true}}
backbones: [test_resnet]
normalizers: [{normalizers}]
model: {{small_input: true}}
seeds: [0]
train: {{epochs: 1, batch_size: 32, lr: 0.05, eval_batch_size: 64}}
grid: {grid}
tiers:
  full: {{}}
  smoke: {{}}
"""


def write_suite(directory: Path, name: str, task: str, options: str, normalizers: str, grid: str) -> None:
    text = SUITE.format(name=name, task=task, options=options, normalizers=normalizers, grid=grid)
    (directory / f"{name}.yaml").write_text(textwrap.dedent(text))


def run(name: str, results: Path) -> list[dict]:
    summary = run_suite(name, "smoke", device="cpu", results_dir=results, progress=False, echo=lambda _: None)
    assert not summary.failed
    return iter_records(results, name)


def test_quantize_task_reports_error_top1_and_integer_path(suites_dir: Path, tmp_path: Path) -> None:
    write_suite(suites_dir, "quant", "quantize", "{calibration_images: 64}", "bn", "{task.bits: [8, 16]}")
    records = sorted(run("quant", tmp_path), key=lambda r: r["setting"]["task.bits"])
    assert [r["setting"]["task.bits"] for r in records] == [8, 16]
    assert [r["extra"]["from_checkpoint"] for r in records] == [False, True]  # trained once, then loaded
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 1
    for record in records:
        metrics = record["metrics"]
        assert metrics["integer_only"] == 1.0 and record["extra"]["float_operations"] == []
        assert metrics["layers_over_bound"] == 0
        assert metrics["max_error_lsb"] <= metrics["error_bound_lsb"] < 1
        assert metrics["top1_change"] == pytest.approx(metrics["top1_quantized"] - metrics["top1_float"])
        assert record["extra"]["test_images"] == 64
    eight, sixteen = (r["metrics"] for r in records)
    assert eight["top1_float"] == sixteen["top1_float"]  # the same trained model
    assert sixteen["min_shift"] > eight["min_shift"]  # wider multipliers allow a larger shift


def test_a_loaded_model_quantizes_to_the_numbers_of_the_model_trained_in_process(suites_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Every metric of a 16-bit conversion is the same whether the run trained its model or loaded it from the
    checkpoint, as with ``--workers 2`` against one process. The trained model used to stay channels-last and
    the loaded one contiguous; their convolutions round differently, which at 16 bits moves a few quantized
    inputs by one step (``max_error_lsb`` 0.5000032 against 0.5000051 in qbn-fmnist)."""
    write_suite(suites_dir, "quant16", "quantize", "{calibration_images: 64}", "bn", "{task.bits: [16]}")
    (trained,) = run("quant16", tmp_path)
    for record in (tmp_path / "runs" / "quant16").glob("*.json"):
        record.unlink()
    (loaded,) = run("quant16", tmp_path)
    assert (trained["extra"]["from_checkpoint"], loaded["extra"]["from_checkpoint"]) == (False, True)
    assert computed_fields(loaded) == computed_fields(trained)


def test_quantize_task_refuses_a_model_without_batchnorm(suites_dir: Path, tmp_path: Path) -> None:
    write_suite(suites_dir, "quant-none", "quantize", "{}", "none", "{}")
    with pytest.raises(UserError, match="no BatchNorm2d to quantize; allowed: bn, qbn"):
        run("quant-none", tmp_path)


def test_memory_task_measures_each_configuration_in_its_own_process(suites_dir: Path, tmp_path: Path) -> None:
    write_suite(suites_dir, "mem", "memory", "{image_size: 32, num_classes: 10, steps: 1, warmup: 1}",
                "bn, mimicnorm", "{}")
    records = run("mem", tmp_path)
    assert len(records) == 2
    for record in records:
        metrics = record["metrics"]
        assert record["extra"]["memory_measure"] == "peak RSS, own process"
        assert record["peak_memory_mb"] == metrics["peak_memory_mb"] >= metrics["memory_before_mb"] > 0
        assert metrics["step_memory_mb"] == pytest.approx(metrics["peak_memory_mb"] - metrics["memory_before_mb"])
        assert metrics["images_per_s"] == pytest.approx(32 / (metrics["step_time_ms"] / 1000))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs")
def test_peak_memory_window_starts_at_the_reset() -> None:
    held = torch.ones(64 * 2**20 // 4)  # 64 MB, then freed: before the reset it raises the high-water mark
    del held
    before = reset_peak_memory(CPU)
    assert window_peak_memory_mb(CPU) < before + 16  # the earlier 64 MB no longer counts
    tensor = torch.ones(32 * 2**20 // 4)  # 32 MB of new resident pages
    assert window_peak_memory_mb(CPU) - before >= 0.9 * tensor.numel() * 4 / 2**20
