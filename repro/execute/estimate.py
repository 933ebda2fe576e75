"""How long a run will take on a device kind, and what that estimate rests on.

Three bases, best first:

1. ``measured``: complete records of the same configuration (any seed) on the same device kind that trained, or
   loaded, their model as the run will; their mean wall time. The seed changes no shape, so it changes the time
   only by noise.
2. ``cost model, fitted``: where the records of the same task on this device kind determine them (workloads that
   differ in more than their length), the cost model's three terms (FLOP time, passes, runs) are refitted to their
   wall times by non-negative least squares, ``t = a·FLOP time + b·passes + c``: a per-pass and a per-run cost
   measured on the device instead of guessed. Otherwise ``calibrated``: the cost model scaled by the ratio of
   measured to modelled time summed over those records (the sums weigh the long runs, whose time a plan is mostly
   made of). Only runs that did their own whole work count: not runs that report another's numbers
   (``shared_from``), trainings loaded from the checkpoint cache, or diverged runs (they stopped early); an
   evaluation that loaded its model is compared with the cost of evaluating only. Nor do runs on generated stand-in
   data without explicit subsets (smoke tiers of datasets not here), whose size the cost model does not know.
3. ``cost model``: the images a run pushes through its model times the model's forward FLOPs (counted once per
   architecture by ``torch.utils.flop_counter`` on a one-image batch), over a per-device rate, plus a fixed
   cost per pass (kernel launches, Python): small models at 28 px are launch-bound, not FLOP-bound.

A training image costs three forward passes (forward, and a backward of about twice that). What a run computes
(its ``Workload``) is the task's to say: ``repro.tasks.workload``; this module turns it into seconds.
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.errors import UserError
from repro.tasks import TASKS, RunSpec
from repro.tasks.base import typed_config
from repro.tasks.config import RunConfig
from repro.tasks.workload import Workload, dataset_shape, device_type


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
class CostTerms:
    """A run's work in the cost model's units: seconds of FLOPs at the device's prior rate, and passes."""

    flop_seconds: float
    passes: float


def cost_terms(config: RunConfig, workload: Workload, kind: str) -> CostTerms:
    rate = DEVICE_RATES.get(kind, DEVICE_RATES["h200"])
    shape = dataset_shape(config.dataset.name)
    options = json.dumps(config.normalizer.options, sort_keys=True)
    flops = forward_flops(config.backbone, config.normalizer.name, options, config.model.small_input,
                          shape.image_size, shape.channels, shape.num_classes)
    return CostTerms(flops * (3 * workload.train_images + workload.forward_images) / rate.flops_per_s,
                     workload.passes)


def prior_seconds(terms: CostTerms, kind: str) -> float:
    """The uncalibrated cost model: the device's prior per-pass and per-run costs added to the FLOP time."""
    rate = DEVICE_RATES.get(kind, DEVICE_RATES["h200"])
    return terms.flop_seconds + terms.passes * rate.seconds_per_pass + rate.seconds_per_run


def modelled_seconds(config: RunConfig, workload: Workload, kind: str) -> float:
    return prior_seconds(cost_terms(config, workload, kind), kind)


@dataclass(frozen=True)
class FittedCosts:
    """``t = flop_scale·FLOP time + seconds_per_pass·passes + seconds_per_run``, fitted to measured runs."""

    flop_scale: float
    seconds_per_pass: float
    seconds_per_run: float

    def seconds(self, terms: CostTerms) -> float:
        return self.flop_scale * terms.flop_seconds + self.seconds_per_pass * terms.passes + self.seconds_per_run


def fit_costs(rows: list[tuple[CostTerms, float]]) -> FittedCosts | None:
    """Non-negative least squares of measured seconds on (FLOP time, passes, 1); None unless the rows determine the
    three costs: workloads that are not all on one line of the (FLOP time, passes) plane (runs that differ only in
    their number of epochs scale both terms alike, so they cannot tell a pass's cost from a FLOP's). Three unknowns:
    the best non-negative solution over every subset of the terms (the active-set solution, by enumeration)."""
    import itertools

    import numpy as np

    features = np.array([[terms.flop_seconds, terms.passes, 1.0] for terms, _ in rows])
    if np.linalg.matrix_rank(features / np.maximum(np.abs(features).max(axis=0), 1e-12), tol=1e-6) < 3:
        return None
    measured = np.array([seconds for _, seconds in rows])
    best: tuple[float, np.ndarray] | None = None
    for size in (1, 2, 3):
        for columns in itertools.combinations(range(3), size):
            solution, *_ = np.linalg.lstsq(features[:, columns], measured, rcond=None)
            if (solution < 0).any():
                continue
            coefficients = np.zeros(3)
            coefficients[list(columns)] = solution
            residual = float(np.sum((features @ coefficients - measured) ** 2))
            if best is None or residual < best[0]:
                best = (residual, coefficients)
    if best is None:
        return None
    return FittedCosts(*(float(value) for value in best[1]))


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str


class Estimator:
    """Estimates run times on one device kind from the records in a results folder, else the cost model."""

    def __init__(self, results_dir: Path, kind: str) -> None:
        from repro.store.records import COMPLETE_STATUSES, iter_records

        self.kind = kind
        self._measured: dict[tuple[str, bool], list[float]] = {}  # (config, model loaded) -> wall times
        self._runs: dict[str, list[tuple[CostTerms, float]]] = {}  # task -> (cost terms, measured seconds)
        self._sharing: dict[str, set[int]] = {}  # task -> runs side by side on the device when they were measured
        for record in iter_records(results_dir):
            if record.get("status") not in COMPLETE_STATUSES or record_device_kind(record) != kind:
                continue
            wall = record.get("wall_time_s")
            stored = record.get("config")
            if not isinstance(wall, int | float) or not isinstance(stored, dict) or record.get("shared_from"):
                continue
            loaded = bool((record.get("extra") or {}).get("from_checkpoint"))
            if loaded and stored.get("task") == "train":  # a training done elsewhere, maybe on another device
                continue
            self._measured.setdefault((seedless_key(stored), loaded), []).append(float(wall))
            if record["status"] != "ok":  # diverged: it stopped before doing its whole workload
                continue
            config = _typed_or_none(stored)
            if config is None:
                continue
            if config.dataset.generated and not (config.dataset.train_subset and config.dataset.test_subset):
                continue  # a small stand-in whose size the cost model does not know
            try:
                terms = cost_terms(config, TASKS.get(config.task).workload(config, loaded, device_type(kind)), kind)
            except Exception:  # a backbone this version cannot build: no calibration from it
                continue
            self._runs.setdefault(config.task, []).append((terms, float(wall)))
            sharing = (record.get("provenance") or {}).get("runs_sharing_device")
            if isinstance(sharing, int):
                self._sharing.setdefault(config.task, set()).add(sharing)
        self._fits = {task: fit_costs(rows) for task, rows in self._runs.items()}
        self._scales = {task: sum(seconds for _, seconds in rows) / sum(prior_seconds(terms, kind) for terms, _ in rows)
                        for task, rows in self._runs.items()}

    def estimate(self, run: RunSpec, workload: Workload, model_loaded: bool = False) -> Estimate:
        """``workload`` as the run's task computes it; ``model_loaded``: the run's trained model comes from the
        checkpoint cache (records of runs that trained it measure something else)."""
        measured = self._measured.get((seedless_key(run.config), model_loaded))
        if measured:
            return Estimate(statistics.fmean(measured), f"measured ({len(measured)} records on {self.kind})")
        config = run.typed_config
        rows = self._runs.get(config.task)
        if not rows:
            return Estimate(modelled_seconds(config, workload, self.kind), f"cost model ({self.kind}, uncalibrated)")
        sharing = sorted(self._sharing.get(config.task, ()))
        made = f", made {' or '.join(map(str, sharing))} to a device" if sharing else ""
        fitted = self._fits[config.task]
        weighed = " (a training step weighed by its operations)" if device_type(self.kind) != "cpu" else ""
        if fitted is not None:
            return Estimate(fitted.seconds(cost_terms(config, workload, self.kind)),
                            f"cost model fitted to {len(rows)} {self.kind} records ({fitted.flop_scale:.2f} x FLOP "
                            f"time + {1000 * fitted.seconds_per_pass:.2f} ms per pass{weighed} + "
                            f"{fitted.seconds_per_run:.1f} s per run{made})")
        scale = self._scales[config.task]
        return Estimate(modelled_seconds(config, workload, self.kind) * scale,
                        f"cost model x {scale:.2f} (calibrated on {self.kind} records{made})")


def _typed_or_none(stored: dict[str, Any]) -> RunConfig | None:
    """A record's config, typed; None for one this version cannot type (a task it lacks, an older schema), which
    then calibrates nothing."""
    try:
        return typed_config(stored)
    except (KeyError, ValueError, UserError):  # pydantic's ValidationError is a ValueError
        return None
