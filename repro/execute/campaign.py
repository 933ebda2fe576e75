"""``repro campaign``: spend a time budget on the pending runs of several suites, in the order that checks the
most references per minute (``repro.execute.plan``), and leave an archive that is current after every completed
run.

A campaign is an ordering-and-budget policy over any executor (``repro.execute.base.Executor``): this process,
local worker processes, or Slurm jobs. A run whose estimate does not fit in the time left is not started; later,
shorter runs still may be. Training checks the deadline after every epoch and stops there with a resumable
checkpoint (``repro.train.resume``), so the next campaign or ``repro run`` continues it; no record is written for
an unfinished run. A cluster job gets no deadline: at the deadline the campaign cancels the jobs still running.
Only data already on disk is used: the hub is switched off.

The executor runs up to its ``slots`` runs at once (``--workers K`` spawned processes sharing the device: small
models at 28 px leave a large GPU mostly idle): a run starts when a slot is free and its estimate fits in the time
left; a run that loads a model another running run is training waits for it, and later runs go first meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from repro.errors import UserError
from repro.execute.base import Executor, ExecutorLost, RunHandle, SuiteRequest
from repro.execute.estimate import Estimate, Estimator, device_kind
from repro.execute.plan import (
    PlannedRun,
    SuitePlan,
    model_ready,
    order_runs,
    plan_suite,
    shared_primary,
    suite_data_present,
    trainers,
)
from repro.store.records import check_writable
from repro.tasks.workload import device_type

#: a run starts only when its estimate times this still fits before the deadline
SAFETY_FACTOR = 1.15
#: what gather, check and the archive need at the end of a campaign
CLOSING_RESERVE_S = 20.0


@dataclass
class CampaignSummary:
    ran: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    stopped_at_deadline: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    archive: Path | None = None
    trained: dict[str, str] = field(default_factory=dict)  # model key -> suite, for the models this campaign saved
    lost: list[str] = field(default_factory=list)  # runs whose worker process died
    cancelled: list[str] = field(default_factory=list)  # cluster jobs still running at the deadline


class Campaign:
    """One budgeted campaign over several suites at one tier, on ``executor`` (default: this process)."""

    def __init__(self, suites: list[str], tier: str, budget_s: float, results_dir: Path, *, device: str = "auto",
                 data_dir: Path | None = None, archive: Path | None = None, progress: bool = False,
                 echo: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 checkpoint_every_s: float | None = None, executor: Executor | None = None,
                 kind: str | None = None) -> None:
        import torch

        from repro.execute.local import SequentialExecutor
        from repro.execute.runner import resolve_device
        from repro.tasks import RunContext

        # a campaign runs what is already here (a GPU window has no network): no dataset comes from the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        self.suites, self.tier, self.results_dir = suites, tier, results_dir
        self.clock = clock
        self.deadline = clock() + budget_s
        self.executor = executor if executor is not None else SequentialExecutor()
        if not self.executor.runs_here and kind is None:
            raise UserError("--plan-device: required with --executor slurm: the device kind the jobs run on, as "
                            "records name it (h200, a100, ...), for the estimates")
        #: the device kind estimates are for (default: this machine's)
        self.kind = kind
        #: the device runs resolve: here, or (None) on the nodes their jobs run on, from ``device_request``
        self.device = resolve_device(device) if self.executor.runs_here else None
        self.device_request = device
        # planning only loads data (to see that it is here)
        self.ctx = RunContext(self.device or torch.device("cpu"), results_dir, data_dir, progress)
        self.archive = archive
        self.data_dir, self.checkpoint_every_s, self.progress = data_dir, checkpoint_every_s, progress
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
        from repro.tasks.base import TASKS, saved_trainings

        kind = kind or self.executor_kind
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
                workload = TASKS.get(item.suite.task).workload(item.run.typed_config, True, device_type(kind))
                item.estimate = estimator.estimate(item.run, workload, model_loaded=True)
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
        slots = self.executor.slots
        lanes = f", {slots} runs at once" if slots > 1 else ""
        where = self.executor.placement(self.device)
        self.log(f"campaign {self.tier} {where}{lanes}: {len(ordered)} pending runs in "
                 f"{', '.join(p.suite.name for p in ready) or 'no suite'}; {self.left() / 60:.1f} min budget")
        queue = [(f"[{index}/{len(ordered)}] {item.label}", item) for index, item in enumerate(ordered, 1)]
        self.executor.expect(len(queue))
        with self.executor:
            self._run_queue(queue, ready, summary)
        self.close(ready)
        return summary

    def _run_queue(self, queue: list[tuple[str, PlannedRun]], plans: list[SuitePlan],
                   summary: CampaignSummary) -> None:
        """The queue on the executor: free slots take the first runs that may start."""
        running: dict[RunHandle, tuple[str, PlannedRun]] = {}
        while queue or running:
            training = {item.model_key for _, item in running.values()
                        if item.saves_model and not self._model_saved(item, summary)}
            in_flight = {(item.suite.name, item.run.run_id) for _, item in running.values()}
            for entry in list(queue):
                if len(running) >= self.executor.slots:
                    break
                prefix, item = entry
                if item.model_key in training or shared_primary(item) in in_flight:
                    continue  # it loads the model that run saves, or copies that run's record
                queue.remove(entry)
                if self._may_start(prefix, item, summary):
                    (handle,) = self.executor.submit(self._request(item), [item.run], self._seconds_to_stop())
                    running[handle] = entry
                    in_flight.add((item.suite.name, item.run.run_id))
                    if item.saves_model and not self._model_saved(item, summary):
                        training.add(item.model_key)
            if running and self._seconds_to_stop() <= 0:
                self._cancel_at_deadline(running, summary)
            if not running:
                continue
            # until the stop time, after which only runs that stop themselves (local ones) are left to wait for
            for handle in self.executor.wait(running, timeout=max(self._seconds_to_stop(), 0) or None):
                prefix, item = running.pop(handle)
                try:
                    result = handle.result()
                except ExecutorLost:
                    self._lose_executor(prefix, item, queue, running, summary)
                    return
                self._finish(prefix, item, result, plans, summary)

    def _request(self, item: PlannedRun) -> SuiteRequest:
        return SuiteRequest(str(item.path), self.tier, self.device_request, self.results_dir, self.data_dir,
                            progress=self.progress, checkpoint_every_s=self.checkpoint_every_s)

    def _seconds_to_stop(self) -> float:
        """Until training must stop: what gathering, checking and archiving need is kept back from the budget."""
        return self.left() - CLOSING_RESERVE_S

    def _cancel_at_deadline(self, running: dict[RunHandle, tuple[str, PlannedRun]], summary: CampaignSummary
                            ) -> None:
        """Cancel what the executor can cancel (cluster jobs); local runs stop themselves at the deadline."""
        for handle, (prefix, item) in list(running.items()):
            if handle.cancel():
                del running[handle]
                summary.cancelled.append(item.run.run_id)
                self.log(f"{prefix}: cancelled at the deadline; no record (its last saved training state stays)")

    def _lose_executor(self, prefix: str, item: PlannedRun, queue: list[tuple[str, PlannedRun]],
                       running: dict[RunHandle, tuple[str, PlannedRun]], summary: CampaignSummary) -> None:
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
        workload = TASKS.get(item.suite.task).workload(item.run.typed_config, model_trained,
                                                      device_type(estimator.kind))
        return estimator.estimate(item.run, workload, model_trained)

    @property
    def executor_kind(self) -> str:
        """The device kind estimates are for: the one given, else this machine's."""
        from repro.store.provenance import device_name

        if self.kind is not None:  # given, or required: runs that do not go here (see __init__)
            return self.kind
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
