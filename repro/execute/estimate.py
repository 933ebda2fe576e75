"""How long a run takes on a device, before running it: a cost model for planning a campaign.

What the estimate rests on, and nothing else:

* the model's work, counted, not guessed: one forward of the run's model (its backbone, normalizer and input
  size) at batch 2 under ``torch.utils.flop_counter.FlopCounterMode`` gives FLOPs per image, and a dispatch
  mode counts the ATen operations of one forward and backward (each at most one kernel launch; views launch
  none, so this errs long), with the one-pass micro-batch groups when the trainer takes that path;
* the recipe: optimizer steps (epochs × batches), passes per step (a normalizer without the one-pass
  micro-batch path, ``Normalizer.micro_batches_in_one_pass``, runs ``batch / micro_batch`` passes), one test
  evaluation per epoch; a training pass is taken as 3 forwards of work;
* a device model: a sustained FLOP rate and a cost per operation. A pass costs the larger of the two
  (launch-bound small models, compute-bound large ones: the host queues kernels while the device computes);
* a fixed start-up cost per run (model build, data on the device, cudnn autotuning);
* calibration: ``calibration_factor`` compares records measured on the same device kind with their estimates;
  pass it back as ``factor`` so that a plan rests on this machine's measured times where they exist.

Runs that share another run's record (``RunSpec.shared_with``) cost nothing here; ``estimate_runs_seconds``
counts a model that several runs train with the same recipe (the checkpoint cache, ``model_key``) once for
tasks that load trained models. Test-time adaptation is estimated as prediction calls over its views; the
corruption of the views themselves is not counted.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from repro.models import build_model
from repro.norms import NORMALIZERS, ghost


@dataclass(frozen=True)
class DeviceModel:
    #: sustained FLOP/s of training a small convnet (bf16 autocast on CUDA), far below the data-sheet peak
    flops_per_s: float
    #: seconds per ATen operation when launch-bound (Python dispatch plus the kernel launch)
    seconds_per_op: float
    #: per-run start-up: building the model, moving data to the device, autotuning
    startup_s: float


#: Device constants, not yet measured on the device: ``h200`` takes 5 µs per operation (what the issue's own
#: figure of ~85 min for a CBN run at micro-batch 2 implies with the operations counted here) and 100 TFLOP/s
#: sustained (an eighth of the 790 TFLOP/s a large bf16 matrix product reaches there: 28 px convolutions are
#: small); ``cpu``: one core of the development machine, from benchmarks/calibrate_estimate.py. Replace them with
#: ``benchmarks/calibrate_estimate.py --device cuda``, or scale by ``calibration_factor``.
DEVICES: dict[str, DeviceModel] = {
    "h200": DeviceModel(flops_per_s=100e12, seconds_per_op=5e-6, startup_s=5.0),
    "cpu": DeviceModel(flops_per_s=40e9, seconds_per_op=20e-6, startup_s=2.0),
}

#: train images, test images, image side, channels, classes of the datasets the suites use
DATASETS: dict[str, tuple[int, int, int, int, int]] = {
    "fashion_mnist": (60_000, 10_000, 28, 1, 10),
    "cifar10": (50_000, 10_000, 32, 3, 10),
    "cifar100": (50_000, 10_000, 32, 3, 100),
    "imagenet": (1_281_167, 50_000, 224, 3, 1000),
}


class _OperationCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@functools.cache
def model_cost(backbone: str, normalizer_json: str, image_size: int, in_chans: int, num_classes: int,
               small_input: bool, ghost_groups: int = 1, grouped: bool = True) -> tuple[float, int, int]:
    """Forward FLOPs per image, ATen operations of one training pass (forward and backward) over ``ghost_groups``
    one-pass micro-batches (``grouped``: in the accelerator's form, ``repro.norms.ghost.grouped_statistics``), and
    of one eval forward."""
    normalizer = json.loads(normalizer_json)
    torch.manual_seed(0)
    model = build_model(backbone, normalizer["name"], num_classes=num_classes, in_chans=in_chans,
                        small_input=small_input, **normalizer["options"]).train()
    images = torch.randn(2, in_chans, image_size, image_size)
    model.normalizer.before_training(model, 0)  # no burn-in: CBN's cross-iteration path is the one counted
    with FlopCounterMode(display=False) as flops:
        model(images)
    batch = images.repeat(ghost_groups, 1, 1, 1)
    with mock.patch.object(ghost, "grouped_statistics", lambda x: grouped):
        for _ in range(5):  # fill CBN's windows (4 is the suites' window); the last pass is counted
            counter = _OperationCounter()
            with ghost.ghost_batches(model, 2), counter:
                model(batch).sum().backward()
            model.normalizer.after_step(model)
    with torch.no_grad(), _OperationCounter() as eval_ops:
        model.eval()(images)
    return flops.get_total_flops() / 2, counter.count, eval_ops.count


def _pass_seconds(device: DeviceModel, flops: float, operations: int) -> float:
    return max(flops / device.flops_per_s, operations * device.seconds_per_op)


def _dataset_shape(config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    dataset = config["dataset"]
    train, test, size, channels, classes = DATASETS[dataset["name"]]
    return (dataset.get("train_subset") or train, dataset.get("test_subset") or test, size, channels, classes)


def training_seconds(config: dict[str, Any], device: DeviceModel) -> float:
    """Training with per-epoch test evaluation, as ``repro.train.train_and_evaluate`` runs it."""
    train_images, test_images, size, channels, classes = _dataset_shape(config)
    normalizer = config["normalizer"]
    train = config["train"]
    batch = train["batch_size"]
    steps = train_images // batch
    if train.get("max_steps_per_epoch"):
        steps = min(steps, train["max_steps_per_epoch"])
    groups = batch // (train.get("micro_batch") or batch)
    one_pass = NORMALIZERS.get(normalizer["name"]).micro_batches_in_one_pass and not train.get("mixup_alpha")
    flops, train_ops, eval_ops = model_cost(config["backbone"], json.dumps(normalizer, sort_keys=True), size,
                                            channels, classes, config["model"].get("small_input", False),
                                            groups if one_pass else 1, device is not DEVICES["cpu"])
    passes = 1 if one_pass else groups
    step = passes * _pass_seconds(device, 3 * flops * batch / passes, train_ops)
    eval_batch = train.get("eval_batch_size", 1000)
    evaluation = math.ceil(test_images / eval_batch) * _pass_seconds(device, flops * eval_batch, eval_ops)
    return train["epochs"] * (steps * step + evaluation)


def adaptation_seconds(config: dict[str, Any], device: DeviceModel) -> float:
    """Prediction calls of a ``tta`` run: every method at every test batch size over every view."""
    _, test_images, size, channels, classes = _dataset_shape(config)
    options = config["task_options"]
    flops, train_ops, eval_ops = model_cost(config["backbone"], json.dumps(config["normalizer"], sort_keys=True),
                                            size, channels, classes, config["model"].get("small_input", False))
    images = options.get("images") or test_images
    views = len(options["corruptions"]) * len(options["severities"]) + bool(options.get("clean"))
    total = 0.0
    for method in options["methods"]:
        stepped = method["name"] == "tent"  # a forward, a backward and an optimizer step per batch
        for batch in options["batch_sizes"]:
            ops, work = (train_ops, 3 * flops * batch) if stepped else (eval_ops, flops * batch)
            total += views * math.ceil(images / batch) * _pass_seconds(device, work, ops)
    return total


def estimate_run_seconds(run_config: dict[str, Any], device_kind: str, factor: float = 1.0) -> float:
    """Seconds one run takes on ``device_kind`` (a key of ``DEVICES``), its model trained from scratch.

    ``factor`` scales the estimate (``calibration_factor`` from measured records of this device kind).
    """
    device = DEVICES[device_kind]
    seconds = device.startup_s
    if run_config["task"] in ("train", "tta", "quantize"):
        seconds += training_seconds(run_config, device)
    if run_config["task"] == "tta":
        seconds += adaptation_seconds(run_config, device)
    return factor * seconds


def estimate_runs_seconds(runs: Iterable[Any], device_kind: str, factor: float = 1.0,
                          trained: set[str] | None = None) -> float:
    """Seconds for the runs of an expansion (``RunSpec``s), in order.

    Shared runs (``shared_with``) are free. A model in the checkpoint cache (``model_key``) is not trained again:
    tasks that load models (every task but ``train``) cache what they train, a ``train`` run caches with
    ``save_checkpoint`` and reports a model another suite cached. Pass one ``trained`` set over the suites of a
    campaign, in the order they run, to count that across suites.
    """
    from repro.suite.tasks import model_key

    device = DEVICES[device_kind]
    trained = set() if trained is None else trained
    total = 0.0
    for run in runs:
        if run.shared_with:
            continue
        seconds = estimate_run_seconds(run.config, device_kind)
        key = model_key(run.config)
        if key in trained:
            seconds -= training_seconds(run.config, device)
        elif run.config["task"] != "train" or run.config["task_options"].get("save_checkpoint"):
            trained.add(key)
        total += seconds
    return factor * total


def calibration_factor(records: Iterable[dict[str, Any]], device_kind: str) -> float | None:
    """Median of measured wall time over estimate, for complete unshared records run on ``device_kind``.

    A record's device is its provenance ``device_name`` (the CPU model, or the GPU's name: an "NVIDIA H200"
    record matches ``"h200"``; ``"cpu"`` matches records whose ``device`` is cpu). None when no record matches.
    """
    ratios = []
    for record in records:
        provenance = record.get("provenance", {})
        device = "cpu" if provenance.get("device") == "cpu" else str(provenance.get("device_name", "")).lower()
        if (record.get("status") != "ok" or record.get("shared_from") or not record.get("wall_time_s")
                or device_kind not in device.replace(" ", "")):
            continue
        ratios.append(record["wall_time_s"] / estimate_run_seconds(record["config"], device_kind))
    return statistics.median(ratios) if ratios else None
