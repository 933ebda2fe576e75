"""``repro campaign``: spend a time budget on the pending runs of several suites, in the order that checks the
most references per minute, and leave an archive that is current after every completed run.

Order, across suites:

1. one seed (the tier's first) of every setting that some reference of the tier needs;
2. the other seeds of those settings;
3. runs that no reference needs.

Within each phase, runs go by references served per estimated minute. Runs that reuse one trained model through the
checkpoint cache are kept together, the run that saves it first: ``quantize`` and ``tta`` runs load it, and a
``train`` run reports another suite's saved training of the same recipe (fmnist-baseline's BN model is
fmnist-normalizers'). Once the model exists their estimates drop its training. A run whose estimate does not fit in the
time left is not started; later, shorter runs still may be. Training checks the deadline after every epoch and stops
there with a resumable checkpoint (``repro.train.resume``), so the next campaign or ``repro run`` continues it; no
record is written for an unfinished run. Only data already on disk is used: the hub is switched off.

With ``workers`` > 1 the runs go, in that order, to that many spawned processes sharing the device (small models
at 28 px leave a large GPU mostly idle): a run starts when a process is free and its estimate fits in the time
left; a run that loads a model another running run is training waits for it, and later runs go first meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.errors import UserError
from repro.execute.estimate import Estimate, Estimator, device_kind
from repro.store.records import check_writable, is_current, read_record, record_path
from repro.suite.expand import matches
from repro.suite.schema import Suite
from repro.tasks.workload import device_type

#: a run starts only when its estimate times this still fits before the deadline
SAFETY_FACTOR = 1.15
#: what gather, check and the archive need at the end of a campaign
CLOSING_RESERVE_S = 20.0


def parse_duration(text: str, flag: str = "--budget") -> float:
    """``9m``, ``90s``, ``1h30m`` or plain seconds, as seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise UserError(f"{flag} {text!r}: allowed: a duration such as 90s, 9m, 1h30m, or seconds")
    hours, minutes, seconds = (float(p) if p else 0.0 for p in parts.groups())
    return 3600 * hours + 60 * minutes + seconds


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
        key = model_key(run.config) if uses_model_cache(suite.task, run.config) else None
        item = PlannedRun(suite, path, run, references, phase, key, saves_model=saves_model(suite.task, run.config))
        if run.shared_with:  # reports an earlier run's numbers (repro.suite.expand): nothing to compute
            item.estimate = Estimate(0.0, "shared with another run")
        else:
            ready = model_ready(item, saved_models)
            workload = task.workload(run.config, ready, device_type(estimator.kind))
            item.estimate = estimator.estimate(run.config, workload, ready)
        planned.append(item)
    return SuitePlan(suite, path, tier, planned, complete)


def uses_model_cache(task: str, config: dict[str, Any]) -> bool:
    """Whether a run's trained model may come from the checkpoint cache: tasks that evaluate trained models load
    it, and a train task reports another suite's saved training of the same recipe."""
    return task in ("quantize", "tta", "train") and not config["model"].get("pretrained")


def saves_model(task: str, config: dict[str, Any]) -> bool:
    """Whether a run leaves its trained model in the checkpoint cache: tasks that evaluate trained models save
    what they train, and a train task does when asked (``save_checkpoint``)."""
    if task in ("quantize", "tta"):
        return not config["model"].get("pretrained")
    return task == "train" and bool(config.get("task_options", {}).get("save_checkpoint"))


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
        specs = {repr(sorted(p.run.config["dataset"].items())): p.run.config["dataset"] for p in plan.runs}
        for spec in specs.values():
            ctx.dataset(spec)
    except UserError as err:
        return str(err)
    return None


@dataclass
class CampaignSummary:
    ran: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    stopped_at_deadline: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    archive: Path | None = None
    trained: dict[str, str] = field(default_factory=dict)  # model key -> suite, for the models this campaign saved
    lost: list[str] = field(default_factory=list)  # runs whose worker process died


class Campaign:
    """One budgeted campaign over several suites at one tier, on this process's device."""

    def __init__(self, suites: list[str], tier: str, budget_s: float, results_dir: Path, *, device: str = "auto",
                 data_dir: Path | None = None, archive: Path | None = None, progress: bool = False,
                 echo: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 checkpoint_every_s: float | None = None, workers: int = 1) -> None:
        from repro.execute.runner import resolve_device
        from repro.tasks import RunContext

        # a campaign runs what is already here (a GPU window has no network): no dataset comes from the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        self.suites, self.tier, self.results_dir = suites, tier, results_dir
        self.clock = clock
        self.deadline = clock() + budget_s
        self.device = resolve_device(device)
        # training stops early enough to leave time for gathering, checking and archiving
        self.ctx = RunContext(self.device, results_dir, data_dir, progress, deadline=self.deadline - CLOSING_RESERVE_S,
                              clock=clock, checkpoint_every_s=checkpoint_every_s)
        self.archive = archive
        self.data_dir, self.checkpoint_every_s, self.workers = data_dir, checkpoint_every_s, workers
        self.log_path = results_dir / "campaign.log"
        self._echo = echo
        self.checks: list = []  # the closing check's results (repro.results.check.CheckResult)
        self._saved_before: dict[str, str | None] = {}  # the checkpoint cache when the campaign was planned

    def log(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        self._echo(stamped)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as out:
            out.write(stamped + "\n")

    def left(self) -> float:
        return self.deadline - self.clock()

    def plans(self, kind: str | None = None) -> list[SuitePlan]:
        from repro.store.provenance import device_name
        from repro.tasks.base import TASKS, saved_trainings

        kind = kind or device_kind(device_name(self.device), self.device.type)
        estimator = Estimator(self.results_dir, kind)
        self._saved_before = saved_trainings(self.results_dir)
        plans = []
        for name in self.suites:
            plan = plan_suite(name, self.tier, self.results_dir, estimator, self._saved_before)
            plan.skipped_reason = suite_data_present(plan, self.ctx) if plan.runs else None
            plans.append(plan)
        ready = [plan for plan in plans if not plan.skipped_reason]
        # a model this campaign trains and saves is trained once: the runs that use it drop its training
        first = trainers(ready)
        for item in (item for plan in ready for item in plan.runs):
            trainer = first.get(item.model_key)
            if trainer is None or item is trainer or item.run.shared_with or model_ready(item, self._saved_before):
                continue
            if model_ready(item, {item.model_key: trainer.suite.name}):
                workload = TASKS.get(item.suite.task).workload(item.run.config, True, device_type(kind))
                item.estimate = estimator.estimate(item.run.config, workload, model_loaded=True)
        return plans

    def run(self) -> CampaignSummary:
        from repro.execute.archive import check_archive_path

        # what is written after every run must be writable before the first: a window is not spent on runs whose
        # records and archive cannot be kept
        check_writable(self.results_dir, f"--results {self.results_dir}")
        if self.archive is not None:
            check_archive_path(self.archive)
        summary = CampaignSummary(archive=self.archive)
        plans = self.plans()
        for plan in plans:
            if plan.skipped_reason:
                self.log(f"{plan.suite.name}: skipped, data not present: {plan.skipped_reason}")
        ready = [plan for plan in plans if not plan.skipped_reason]
        ordered = order_runs(ready)
        lanes = f" on {self.workers} workers" if self.workers > 1 else ""
        self.log(f"campaign {self.tier} on {self.device}{lanes}: {len(ordered)} pending runs in "
                 f"{', '.join(p.suite.name for p in ready) or 'no suite'}; {self.left() / 60:.1f} min budget")
        queue = [(f"[{index}/{len(ordered)}] {item.label}", item) for index, item in enumerate(ordered, 1)]
        if self.workers > 1:
            self._run_on_workers(queue, ready, summary)
        else:
            self._run_here(queue, ready, summary)
        self.close(ready)
        return summary

    def _run_here(self, queue: list[tuple[str, PlannedRun]], plans: list[SuitePlan], summary: CampaignSummary
                  ) -> None:
        from repro.execute.runner import RunRecorder

        recorders = {}
        for prefix, item in queue:
            if not self._may_start(prefix, item, summary):
                continue
            if item.suite.name not in recorders:
                recorders[item.suite.name] = RunRecorder(item.suite, item.path, self.tier, self.ctx)
            self._finish(prefix, item, recorders[item.suite.name].run(item.run), plans, summary)

    def _run_on_workers(self, queue: list[tuple[str, PlannedRun]], plans: list[SuitePlan],
                        summary: CampaignSummary) -> None:
        """The queue on ``workers`` spawned processes: free processes take the first runs that may start."""
        from repro.execute.base import SuiteRequest
        from repro.execute.local import run_in_worker, worker_pool

        running: dict[concurrent.futures.Future, tuple[str, PlannedRun]] = {}
        with worker_pool(self.workers, self.device) as (pool, sharing):
            while queue or running:
                training = {item.model_key for _, item in running.values()
                            if item.saves_model and not self._model_saved(item, summary)}
                in_flight = {(item.suite.name, item.run.run_id) for _, item in running.values()}
                for entry in list(queue):
                    if len(running) >= self.workers:
                        break
                    prefix, item = entry
                    if item.model_key in training or shared_primary(item) in in_flight:
                        continue  # it loads the model that run saves, or copies that run's record
                    queue.remove(entry)
                    if self._may_start(prefix, item, summary):
                        request = SuiteRequest(str(item.path), self.tier, str(self.device), self.results_dir,
                                               self.data_dir, progress=False,
                                               checkpoint_every_s=self.checkpoint_every_s)
                        seconds_left = self.deadline - CLOSING_RESERVE_S - self.clock()
                        running[pool.submit(run_in_worker, request, item.run.run_id, sharing, seconds_left)] = entry
                        in_flight.add((item.suite.name, item.run.run_id))
                        if item.saves_model and not self._model_saved(item, summary):
                            training.add(item.model_key)
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    prefix, item = running.pop(future)
                    try:
                        _, result = future.result()
                    except concurrent.futures.process.BrokenProcessPool:
                        self._lose_workers(prefix, item, queue, running, summary)
                        return
                    self._finish(prefix, item, result, plans, summary)

    def _lose_workers(self, prefix: str, item: PlannedRun, queue: list[tuple[str, PlannedRun]],
                      running: dict[concurrent.futures.Future, tuple[str, PlannedRun]],
                      summary: CampaignSummary) -> None:
        """A worker process died (killed, out of memory): the pool is unusable. The runs it held have no record;
        the campaign ends here, and still gathers, checks and archives what completed."""
        for lost_prefix, lost in [(prefix, item), *running.values()]:
            summary.lost.append(lost.run.run_id)
            self.log(f"{lost_prefix}: lost, a worker process died; no record (a later campaign runs it again)")
        for waiting_prefix, waiting in queue:
            summary.not_started.append(waiting.run.run_id)
            self.log(f"{waiting_prefix}: not started, the worker processes are gone")
        running.clear()
        queue.clear()

    def _may_start(self, prefix: str, item: PlannedRun, summary: CampaignSummary) -> bool:
        """Whether the run's estimate (with its model trained already, or not) fits in the time left; logged."""
        estimate = self._estimate(item, self._model_saved(item, summary))
        if SAFETY_FACTOR * estimate.seconds + CLOSING_RESERVE_S > self.left():
            summary.not_started.append(item.run.run_id)
            self.log(f"{prefix}: not started, needs ~{estimate.seconds / 60:.1f} min ({estimate.basis}), "
                     f"{self.left() / 60:.1f} min left")
            return False
        self.log(f"{prefix}: start, ~{estimate.seconds / 60:.1f} min ({estimate.basis}), {item.references} references")
        return True

    def _model_saved(self, item: PlannedRun, summary: CampaignSummary) -> bool:
        """Whether the trained model the run uses (if any) is saved already, so that the run does not train it."""
        return model_ready(item, {**self._saved_before, **summary.trained})

    def _finish(self, prefix: str, item: PlannedRun, result: tuple | None, plans: list[SuitePlan],
                summary: CampaignSummary) -> None:
        from repro.execute.runner import SuiteRunSummary, report_outcome

        if result is None:
            self.log(f"{prefix}: completed by another process meanwhile; skipped")
            return
        outcome, error = result
        report_outcome(SuiteRunSummary(item.suite.name, self.tier), item.run, prefix, outcome, error, self.log)
        if outcome.status == "stopped":
            summary.stopped_at_deadline.append(item.run.run_id)
            return
        if outcome.status == "locked":
            summary.not_started.append(item.run.run_id)
            return
        summary.ran.append(item.run.run_id)
        summary.statuses[outcome.status] = summary.statuses.get(outcome.status, 0) + 1
        if item.saves_model and outcome.status == "ok":
            summary.trained.setdefault(item.model_key, item.suite.name)
        self.refresh_archive(plans, final=False)

    def _estimate(self, item: PlannedRun, model_trained: bool) -> Estimate:
        """Estimated again before each start: the records written so far calibrate it to this device, under
        whatever else shares it."""
        from repro.tasks import TASKS

        estimator = Estimator(self.results_dir, self.executor_kind)
        workload = TASKS.get(item.suite.task).workload(item.run.config, model_trained, device_type(estimator.kind))
        return estimator.estimate(item.run.config, workload, model_trained)

    @property
    def executor_kind(self) -> str:
        from repro.store.provenance import device_name

        return device_kind(device_name(self.device), self.device.type)

    def close(self, plans: list[SuitePlan]) -> None:
        """Gather and check the campaign's suites, then write the final archive."""
        from repro.results.check import STATUSES, failing
        from repro.results.gather import gather, run_checks

        names = [plan.suite.name for plan in plans]
        if names:
            for results, _ in gather(self.results_dir, names):
                runs = results.frame["run_id"].nunique() if "run_id" in results.frame else 0
                self.log(f"gathered {results.name}: {runs} runs")
            self.checks = run_checks(self.results_dir, names)
            counts = {s: sum(r.status == s for r in self.checks) for s in STATUSES}
            self.log("check: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; strict: "
                     f"{len(failing(self.checks, strict=True))} references not yet reproduced or failing")
        self.refresh_archive(plans, final=True)

    def refresh_archive(self, plans: list[SuitePlan], final: bool) -> None:
        if self.archive is None:
            return
        from repro.execute.archive import pack

        size = pack(self.results_dir, [plan.suite.name for plan in plans], self.archive, log=self.log_path)
        if final:
            self.log(f"archive {self.archive}: {size / 2**20:.2f} MiB")
