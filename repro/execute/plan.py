"""The plan of a campaign (``repro.execute.campaign``): its pending runs with their estimates, and their order.

Order, across suites:

1. one seed (the tier's first) of every setting that some reference of the tier needs;
2. the other seeds of those settings;
3. runs that no reference needs.

Within each phase, runs go by references served per estimated minute. Runs that reuse one trained model through the
checkpoint cache are kept together, the run that saves it first: ``quantize`` and ``tta`` runs load it, and a
``train`` run reports another suite's saved training of the same recipe (fmnist-baseline's BN model is
fmnist-normalizers'). Once the model exists their estimates drop its training.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.errors import UserError
from repro.execute.estimate import Estimate, Estimator
from repro.store.records import is_current, read_record, record_path
from repro.suite.expand import matches
from repro.suite.schema import Suite
from repro.tasks.config import RunConfig
from repro.tasks.workload import device_type


def parse_duration(text: str, flag: str = "--budget", *, above_zero: bool = False) -> float:
    """``9m``, ``90s``, ``1h30m`` or plain seconds, as seconds; ``above_zero`` for a budget or an interval that
    nothing could be done in (0 stays allowed where it means "every time", as for ``--checkpoint-every``)."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise UserError(f"{flag} {text!r}: allowed: a duration such as 90s, 9m, 1h30m, or seconds")
    hours, minutes, seconds = (float(p) if p else 0.0 for p in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if above_zero and total <= 0:
        raise UserError(f"{flag} {text!r}: must be more than 0, such as 90s or 9m")
    return total


@dataclass
class PlannedRun:
    suite: Suite
    path: Path
    run: Any  # RunSpec
    references: int
    phase: int
    model_key: str | None
    estimate: Estimate | None = None
    #: the run leaves its trained model in the checkpoint cache for the runs that share ``model_key``
    saves_model: bool = False

    @property
    def label(self) -> str:
        return f"{self.suite.name} {self.run.label}"


@dataclass
class SuitePlan:
    suite: Suite
    path: Path
    tier: str
    runs: list[PlannedRun]
    complete: int
    skipped_reason: str | None = None

    def as_dict(self, device: str) -> dict[str, Any]:
        bases = sorted({p.estimate.basis for p in self.runs if p.estimate})
        return {
            "suite": self.suite.name, "version": self.suite.version, "tier": self.tier, "device": device,
            "pending_runs": len(self.runs), "complete_runs": self.complete,
            "estimated_minutes": round(sum(p.estimate.seconds for p in self.runs if p.estimate) / 60, 2),
            "estimate_basis": bases, "skipped": self.skipped_reason,
        }


def references_needing(suite: Suite, tier: str, setting: dict[str, Any]) -> int:
    """How many of the tier's references use a run of ``setting``."""
    count = 0
    for reference in suite.references:
        if tier not in reference.tiers:
            continue
        patterns = [reference.setting] if reference.kind == "absolute" else [reference.a, reference.b]
        count += any(matches(setting, pattern) for pattern in patterns)
    return count


def plan_suite(suite_ref: str | Path, tier: str, results_dir: Path, estimator: Estimator,
               saved_models: dict[str, str | None]) -> SuitePlan:
    """The suite's pending runs at ``tier`` with their phase, references and estimates (not yet ordered).

    ``saved_models``: the checkpoint cache as ``repro.tasks.base.saved_trainings`` describes it
    (``Campaign.plans`` then counts the models the campaign's other runs save)."""
    from repro.execute.runner import expand_tier
    from repro.tasks.base import TASKS, model_key

    suite, path, runs = expand_tier(suite_ref, tier)
    task = TASKS.get(suite.task)
    seeds = list(dict.fromkeys(run.setting["seed"] for run in runs))
    planned, complete = [], 0
    for run in runs:
        if is_current(read_record(record_path(results_dir, suite.name, run.run_id)), run.shared_with):
            complete += 1
            continue
        references = references_needing(suite, tier, run.setting)
        phase = 2 if not references else (0 if run.setting["seed"] == seeds[0] else 1)
        key = model_key(run.config) if uses_model_cache(suite.task, run.typed_config) else None
        item = PlannedRun(suite, path, run, references, phase, key,
                          saves_model=saves_model(suite.task, run.typed_config))
        if run.shared_with:  # reports an earlier run's numbers (repro.suite.expand): nothing to compute
            item.estimate = Estimate(0.0, "shared with another run")
        else:
            ready = model_ready(item, saved_models)
            workload = task.workload(run.typed_config, ready, device_type(estimator.kind))
            item.estimate = estimator.estimate(run, workload, ready)
        planned.append(item)
    return SuitePlan(suite, path, tier, planned, complete)


def uses_model_cache(task: str, config: RunConfig) -> bool:
    """Whether a run's trained model may come from the checkpoint cache: tasks that evaluate trained models load
    it, and a train task reports another suite's saved training of the same recipe."""
    return task in ("quantize", "tta", "train") and not config.model.pretrained


def saves_model(task: str, config: RunConfig) -> bool:
    """Whether a run leaves its trained model in the checkpoint cache: tasks that evaluate trained models save
    what they train, and a train task does when asked (``save_checkpoint``)."""
    if task in ("quantize", "tta"):
        return not config.model.pretrained
    return task == "train" and config.task_options.save_checkpoint


def model_ready(item: PlannedRun, saved_models: dict[str, str | None]) -> bool:
    """Whether the run's model is in ``saved_models`` in a form the run uses instead of training: any checkpoint
    for the tasks that evaluate it, another suite's saved training for a train run
    (``repro.tasks.base.reports_saved_training``)."""
    if item.model_key is None or item.model_key not in saved_models:
        return False
    if item.suite.task != "train":
        return True
    return saved_models[item.model_key] not in (None, item.suite.name)


def trainers(plans: list[SuitePlan]) -> dict[str, PlannedRun]:
    """Model key -> the run that trains and saves the model for the others that use it: a train run before the
    tasks that evaluate models (its saved training is then reported by other suites' train runs too), else the
    first in the suites' order."""
    savers = [item for plan in plans for item in plan.runs if item.saves_model]
    first: dict[str, PlannedRun] = {}
    for item in sorted(savers, key=lambda item: item.suite.task != "train"):
        first.setdefault(item.model_key, item)
    return first


def order_runs(plans: list[SuitePlan]) -> list[PlannedRun]:
    """Phases first; within a phase, most references per estimated minute; runs sharing a model together, the one
    that trains and saves it first (``trainers``); a run that reports another's numbers (``shared_with``) right
    after that run, whose record it copies."""
    runs = [item for plan in plans for item in plan.runs]
    first = trainers(plans)

    def value(item: PlannedRun) -> float:
        minutes = max(item.estimate.seconds / 60, 1e-3)
        return item.references / minutes

    runs.sort(key=lambda item: (item.phase, -value(item)))
    pending = {(item.suite.name, item.run.run_id) for item in runs}
    followers: dict[tuple[str, str], list[PlannedRun]] = {}
    for item in runs:
        if shared_primary(item) in pending:
            followers.setdefault(shared_primary(item), []).append(item)
    ordered, placed = [], set()
    for item in runs:
        if id(item) in placed or shared_primary(item) in followers:
            continue
        group = [item] if item.model_key is None else sorted(
            (other for other in runs if other.model_key == item.model_key and id(other) not in placed),
            key=lambda other: other is not first.get(other.model_key))
        for member in group:
            for placing in (member, *followers.get((member.suite.name, member.run.run_id), ())):
                placed.add(id(placing))
                ordered.append(placing)
    return ordered


def shared_primary(item: PlannedRun) -> tuple[str, str] | None:
    """The (suite, run id) whose record the run reports, if it shares one (``repro.suite.expand``)."""
    return (item.suite.name, item.run.shared_with) if item.run.shared_with else None


def window_seconds(ordered: list[PlannedRun], workers: int) -> float:
    """How long ``ordered`` takes on ``workers`` processes dispatched as a campaign dispatches them, each run
    taking its estimate: a free process takes the first run that does not wait for a model being trained (and
    saved) by a running run."""
    running: list[tuple[float, int, str | None]] = []  # (end, tie-break, key of the model it saves), a heap
    queue, now = list(ordered), 0.0
    while queue or running:
        training = {key for _, _, key in running if key}
        for item in list(queue):
            if len(running) >= workers:
                break
            if item.model_key and item.model_key in training:
                continue
            queue.remove(item)
            saving = item.model_key if item.saves_model else None
            heapq.heappush(running, (now + item.estimate.seconds, id(item), saving))
            training.add(saving)
        now = heapq.heappop(running)[0]
    return now


def suite_data_present(plan: SuitePlan, ctx) -> str | None:
    """None when the datasets of the plan's runs load here; else why not (the loader's own message)."""
    try:
        specs = {p.run.typed_config.dataset.model_dump_json(): p.run.typed_config.dataset for p in plan.runs}
        for spec in specs.values():
            ctx.dataset(spec)
    except UserError as err:
        return str(err)
    return None
