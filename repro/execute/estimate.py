"""How long a run will take on a device kind, and what that estimate rests on.

Three bases, best first:

1. ``measured``: complete records of the same configuration (any seed) on the same device kind; their mean
   wall time. The seed changes no shape, so it changes the time only by noise.
2. ``cost model, calibrated``: the cost model below, scaled by the ratio of measured to modelled time summed
   over the records of the same task on this device kind (a memory probe and a 30-epoch training run err
   differently; the sums weigh the long runs, whose time a plan is mostly made of). Records that did not do
   their own work are left out: runs that report another's numbers (``shared_from``) and trainings loaded from
   the checkpoint cache; an evaluation that loaded its model is compared with the cost of evaluating only. So
   are runs on generated stand-in data without explicit subsets (smoke tiers of datasets not here), whose size
   the cost model does not know.
3. ``cost model``: the images a run pushes through its model times the model's forward FLOPs (counted once per
   architecture by ``torch.utils.flop_counter`` on a one-image batch), over a per-device rate, plus a fixed
   cost per pass (kernel launches, Python): small models at 28 px are launch-bound, not FLOP-bound.

A training image costs three forward passes (forward, and a backward of about twice that).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: train/test sizes of the full splits and the image shape, so that a plan needs no data on disk
DATASET_SHAPES = {
    "fashion_mnist": (60_000, 10_000, 1, 28, 10),
    "cifar10": (50_000, 10_000, 3, 32, 10),
    "cifar100": (50_000, 10_000, 3, 32, 100),
    "imagenet": (1_281_167, 50_000, 3, 224, 1000),
}


@dataclass(frozen=True)
class DeviceRate:
    """Sustained FLOP/s of a training step, the fixed cost of one forward (+ backward) pass, and of one run
    (building the model, moving the data, warming up kernels)."""

    flops_per_s: float
    seconds_per_pass: float
    seconds_per_run: float


#: Uncalibrated starting points: an H200 at about a fifth of its bf16 dense peak (small convolutions in
#: channels-last reach no more), and this project's 2-core CPU as measured by ``benchmarks/step_time.py``.
DEVICE_RATES = {
    "h200": DeviceRate(150e12, 0.004, 10.0),
    "cpu": DeviceRate(40e9, 0.002, 5.0),
}


def device_kind(device_name: str | None, device_type: str | None = None) -> str:
    """A short, stable name for grouping timings: ``h200``, ``a100``, ``cpu``."""
    if device_type == "cpu" or not device_name:
        return "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device_name.upper().replace("NVIDIA", ""))
    return match.group(1).lower() if match else device_name.lower().replace(" ", "_")


def device_type(kind: str) -> str:
    """The torch device type of a device kind: ``cpu``, else ``cuda``."""
    return "cpu" if kind == "cpu" else "cuda"


def record_device_kind(record: dict[str, Any]) -> str:
    provenance = record.get("provenance") or {}
    return device_kind(provenance.get("device_name"), provenance.get("device"))


def seedless_key(config: dict[str, Any]) -> str:
    """A configuration without its seed and tier: runs that share it do the same work."""
    rest = {k: v for k, v in config.items() if k not in ("seed", "tier")}
    return json.dumps(rest, sort_keys=True, default=str)


@functools.cache
def forward_flops(backbone: str, normalizer: str, options_json: str, small_input: bool, image_size: int,
                  in_chans: int, num_classes: int) -> float:
    """FLOPs of one image's forward pass, counted on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from repro.models import build_model

    model = build_model(backbone, normalizer, num_classes=num_classes, in_chans=in_chans, small_input=small_input,
                        **json.loads(options_json)).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, image_size, image_size))
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Workload:
    """What a run computes: images through forward+backward, forward-only images, and passes (launches)."""

    train_images: int = 0
    forward_images: int = 0
    passes: int = 0

    def __add__(self, other: Workload) -> Workload:
        return Workload(self.train_images + other.train_images, self.forward_images + other.forward_images,
                        self.passes + other.passes)


def training_workload(config: dict[str, Any]) -> Workload:
    """The train task's work: every epoch trains on the split and evaluates the test split."""
    train_n, test_n = split_sizes(config["dataset"])
    train = config["train"]
    batch = train["batch_size"]
    steps = train_n // batch
    if train.get("max_steps_per_epoch"):
        steps = min(steps, train["max_steps_per_epoch"])
    # micro-batches go through the model in one pass (repro.norms.ghost) unless mixup draws per micro-batch
    chunks = -(-batch // (train.get("micro_batch") or batch)) if train.get("mixup_alpha", 0) > 0 else 1
    epochs = train["epochs"]
    eval_batches = -(-test_n // train.get("eval_batch_size", batch))
    return Workload(epochs * steps * batch, epochs * test_n, epochs * (steps * chunks + eval_batches))


def split_sizes(dataset: dict[str, Any]) -> tuple[int, int]:
    full_train, full_test, *_ = DATASET_SHAPES.get(dataset["name"], (50_000, 10_000, 3, 32, 10))
    return (min(dataset.get("train_subset") or full_train, full_train),
            min(dataset.get("test_subset") or full_test, full_test))


def modelled_seconds(config: dict[str, Any], workload: Workload, kind: str) -> float:
    rate = DEVICE_RATES.get(kind, DEVICE_RATES["h200"])
    _, _, chans, size, classes = DATASET_SHAPES.get(config["dataset"]["name"], (0, 0, 3, 32, 10))
    normalizer = config["normalizer"]
    flops = forward_flops(config["backbone"], normalizer["name"], json.dumps(normalizer["options"], sort_keys=True),
                          bool(config["model"].get("small_input")), size, chans, classes)
    total = flops * (3 * workload.train_images + workload.forward_images)
    return total / rate.flops_per_s + workload.passes * rate.seconds_per_pass + rate.seconds_per_run


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str


class Estimator:
    """Estimates run times on one device kind from the records in a results folder, else the cost model."""

    def __init__(self, results_dir: Path, kind: str) -> None:
        from repro.results.records import COMPLETE_STATUSES, iter_records

        self.kind = kind
        self._measured: dict[str, list[float]] = {}
        self._calibration: dict[str, list[float]] = {}  # task -> [measured seconds, modelled seconds], summed
        self._sharing: dict[str, set[int]] = {}  # task -> runs side by side on the device when they were measured
        for record in iter_records(results_dir):
            if record.get("status") not in COMPLETE_STATUSES or record_device_kind(record) != kind:
                continue
            wall = record.get("wall_time_s")
            config = record.get("config")
            if not isinstance(wall, int | float) or not isinstance(config, dict) or record.get("shared_from"):
                continue
            loaded = bool((record.get("extra") or {}).get("from_checkpoint"))
            task = config.get("task", "train")
            if loaded and task == "train":  # the wall time of a training done elsewhere, maybe on another device
                continue
            self._measured.setdefault(seedless_key(config), []).append(float(wall))
            dataset = config.get("dataset", {})
            if dataset.get("generated") and not (dataset.get("train_subset") and dataset.get("test_subset")):
                continue  # a small stand-in whose size the cost model does not know
            workload = _workload_of(config, device_type(kind), loaded)
            if workload is not None:
                try:
                    modelled = modelled_seconds(config, workload, kind)
                except Exception:  # a backbone this version cannot build: no calibration from it
                    continue
                sums = self._calibration.setdefault(task, [0.0, 0.0])
                sums[0] += wall
                sums[1] += modelled
                sharing = (record.get("provenance") or {}).get("runs_sharing_device")
                if isinstance(sharing, int):
                    self._sharing.setdefault(task, set()).add(sharing)

    def estimate(self, config: dict[str, Any], workload: Workload) -> Estimate:
        measured = self._measured.get(seedless_key(config))
        if measured:
            return Estimate(statistics.fmean(measured), f"measured ({len(measured)} records on {self.kind})")
        seconds = modelled_seconds(config, workload, self.kind)
        calibration = self._calibration.get(config.get("task", "train"))
        if calibration and calibration[1] > 0:
            scale = calibration[0] / calibration[1]
            sharing = sorted(self._sharing.get(config.get("task", "train"), ()))
            made = f", made {' or '.join(map(str, sharing))} to a device" if sharing else ""
            return Estimate(seconds * scale, f"cost model x {scale:.2f} (calibrated on {self.kind} records{made})")
        return Estimate(seconds, f"cost model ({self.kind}, uncalibrated)")


def _workload_of(config: dict[str, Any], on: str, model_loaded: bool) -> Workload | None:
    """The work a recorded run did, for calibration: with training unless its model came from the checkpoint
    cache."""
    from repro.tasks import TASKS

    if config.get("task", "train") not in TASKS:
        return None
    return TASKS.get(config.get("task", "train")).workload(config, model_loaded, device_type=on)
