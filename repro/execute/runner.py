"""Running a suite: expand, skip runs whose record is complete, hand the rest to an executor, and the one step every
executor takes for a run: run it and write its record atomically (``RunRecorder``).

A run killed half-way leaves no record (records are written once, at the end, by rename), so the next
``repro run`` of the same suite resumes with exactly the runs that are missing or failed.

Data-parallel (``repro run --nproc N``, one process per device under torchrun): every process runs the loop
over the same pending runs, in step, and only rank 0 prints and writes records. A run that raises stops the
suite instead of being recorded as failed, since the other processes would wait for it forever.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repro.errors import UserError
from repro.execute.base import Executor, SuiteRequest
from repro.results.chance import is_collapsed
from repro.store.atomic import write_json_atomic
from repro.store.provenance import provenance, source_version
from repro.store.records import (
    RECORD_SCHEMA,
    check_writable,
    claim_run,
    is_complete,
    is_current,
    read_record,
    record_path,
    release_run,
)
from repro.suite.expand import expand
from repro.suite.load import file_sha256, load_suite
from repro.suite.schema import Suite
from repro.tasks.base import TASKS, RunContext, RunOutcome, RunSpec
from repro.train.distributed import DataParallel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: allowed: auto, cpu, cuda")
    return torch.device(name)


@dataclass
class SuiteRunSummary:
    suite: str
    tier: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    #: runs stopped by a deadline with their training state saved (repro.train.resume)
    stopped: list[str] = field(default_factory=list)
    #: runs handed to a cluster's scheduler (repro.execute.slurm)
    submitted: list[str] = field(default_factory=list)
    #: runs left alone because their lock is held (by a live process, by another host, or by a lock path that is
    #: not a file), also in ``skipped``: not done, so ``repro run`` exits 1
    locked: list[str] = field(default_factory=list)


#: what a record's ``extra`` and its run's line say when the code or the suite file changed while it ran (the
#: record's ``provenance.changed_during_run`` says how)
PROVENANCE_CHANGED = "changed during the run"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _outcome_or_failure(task, run: RunSpec, ctx: RunContext) -> tuple[RunOutcome, str | None]:
    """Run the task; an unexpected exception becomes a ``failed`` outcome so that the suite goes on."""
    start = time.perf_counter()
    try:
        return task.run(run, ctx), None
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:  # a bug or an OOM in one configuration must not lose the others
        summary = "".join(traceback.format_exception_only(err)).strip()
        tail = "".join(traceback.format_tb(err.__traceback__)[-3:])
        return RunOutcome("failed", {}, time.perf_counter() - start), f"{summary}\n{tail}"


def expand_tier(suite_ref: str | Path, tier: str) -> tuple[Suite, Path, list[RunSpec]]:
    suite, path = load_suite(suite_ref)
    if tier not in suite.tiers:
        raise UserError(f"{path}: tier {tier!r} is not defined; allowed: {', '.join(suite.tiers)}")
    return suite, path, expand(suite, tier)


def check_data_parallel(suite_ref: str | Path, tier: str, world_size: int) -> None:
    """Refuse, before any process starts, runs whose result would depend on the number of processes.

    N processes compute what one process computes with ``micro_batch`` (the images each device normalizes
    over) as long as it is set and divides each process's share of the batch, so only such runs may go
    data-parallel; their run ids, and records, are then the same however many processes ran them.
    """
    suite, path, runs = expand_tier(suite_ref, tier)
    if suite.task != "train":
        raise UserError(f"{path}: task {suite.task!r} runs in one process; --nproc applies to task 'train'")
    for run in runs:
        cfg = run.typed_config.train
        if cfg.micro_batch is None:
            raise UserError(f"{path}: field train.micro_batch must be set to run on {world_size} processes "
                            f"(images per device; batch_size {cfg.batch_size} / {world_size} = "
                            f"{cfg.batch_size / world_size:g} would change the recipe)")
        DataParallel(0, world_size, torch.device("cpu")).check_batch_sizes(cfg, where=f"{path}: {run.label}")


class RunRecorder:
    """Runs one run of a suite and writes its record: the one step every executor calls.

    Whoever runs a run writes its record (atomically), so the record does not depend on where it ran: in this
    process, in a worker process, or in a cluster job.
    """

    def __init__(self, suite: Suite, suite_path: Path, tier: str, ctx: RunContext) -> None:
        self.suite, self.suite_path, self.tier, self.ctx = suite, suite_path, tier, ctx
        self.task = TASKS.get(suite.task)()

    def code_version(self) -> dict[str, Any]:
        """The source's commit and dirty flag and the suite file's hash, read now: at a run's start, and again
        when its record is written."""
        return {**source_version(), "suite_sha256": file_sha256(self.suite_path)}

    def run(self, run: RunSpec) -> tuple[RunOutcome, str | None] | None:
        """Run ``run`` and write its record (on rank 0 only when data-parallel); return outcome and error.

        One process per run and results folder (data-parallel ranks share one run and take no lock): when the
        run's lock is held, the outcome is ``locked`` and the error says by whom and how to remove the lock file.
        None when another process completed the run meanwhile.
        """
        ctx, data_parallel = self.ctx, self.ctx.data_parallel
        path_out = record_path(ctx.results_dir, self.suite.name, run.run_id)
        locking = data_parallel is None
        holder = claim_run(path_out) if locking else None
        if holder is not None:
            return RunOutcome("locked", {}, 0.0), holder
        try:
            if locking and not ctx.retrain and is_current(read_record(path_out, warn=False), run.shared_with):
                return None
            return self._run_and_record(run, path_out)
        finally:
            if locking:
                release_run(path_out)

    def _run_and_record(self, run: RunSpec, path_out: Path) -> tuple[RunOutcome, str | None]:
        ctx, data_parallel = self.ctx, self.ctx.data_parallel
        started, code_at_start, cpu_at_start = _now(), self.code_version(), time.process_time()
        primary = (read_record(record_path(ctx.results_dir, self.suite.name, run.shared_with))
                   if run.shared_with else None)
        shared_from = run.shared_with if is_complete(primary) else None
        is_main = data_parallel is None or data_parallel.is_main
        if shared_from:  # the same numbers as an earlier run of this expansion: reported, not executed again
            outcome = self.task.shared_outcome(run, primary, ctx) if is_main else RunOutcome("ok", {}, 0.0)
            outcome.extra["shared_from"] = shared_from
            error = None
        elif data_parallel is None:
            outcome, error = _outcome_or_failure(self.task, run, ctx)
        else:
            outcome, error = self.task.run(run, ctx), None
        if (data_parallel is not None and not data_parallel.is_main) or outcome.status == "stopped":
            return outcome, error  # a stopped run has saved its training state; its record comes when it ends
        data = ctx.dataset(run.typed_config.dataset)
        code_changes = changed_during_run(code_at_start, self.code_version())
        if code_changes:  # the numbers may come from code other than the record names: said on the run's line
            outcome.extra["provenance"] = PROVENANCE_CHANGED
        else:  # a shared run's copy of its primary's note: each record speaks of its own run
            outcome.extra.pop("provenance", None)
        record = {
            "schema": RECORD_SCHEMA, "suite": self.suite.name, "suite_version": self.suite.version,
            "run_id": run.run_id, "status": outcome.status, "tier": self.tier, "setting": run.setting,
            "config": run.config, "metrics": outcome.metrics, "curve": outcome.curve, "rows": outcome.rows,
            "wall_time_s": outcome.wall_time_s, "cpu_time_s": time.process_time() - cpu_at_start,
            "peak_memory_mb": outcome.peak_memory_mb,
            "images_per_s": outcome.images_per_s, "diverged_step": outcome.diverged_step, "extra": outcome.extra,
            "error": error, "started_at": started, "finished_at": _now(), "shared_from": shared_from,
            "provenance": {
                **provenance(ctx.device, ctx.data_fingerprint(run.typed_config.dataset), data.source, code_at_start,
                             run.config.get("plugins")),
                "processes": 1 if data_parallel is None else data_parallel.world_size,
                "runs_sharing_device": ctx.runs_sharing_device,
                **job_provenance(),
                **({"changed_during_run": code_changes} if code_changes else {}),
            },
        }
        if is_collapsed(record):  # finished, but at chance: said in the record and on the run's line
            outcome.extra["collapsed"] = True
        write_json_atomic(path_out, record)
        return outcome, error


def changed_during_run(start: dict[str, Any], end: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields of the code's version that differ between a run's start and its end, each with both values."""
    return {name: {"start": start.get(name), "end": end.get(name)} for name in {**start, **end}
            if start.get(name) != end.get(name)}


def job_provenance() -> dict[str, dict[str, str]]:
    """The cluster job that ran this process (set by repro.execute's job wrapper), so a record names its log."""
    job_id, log = os.environ.get("REPRO_JOB_ID"), os.environ.get("REPRO_JOB_LOG")
    return {"job": {"id": job_id or "", "log": log or ""}} if job_id or log else {}


def complete_run_ids(suite: Suite, runs: list[RunSpec], results_dir: Path, force: bool) -> set[str]:
    """Runs whose record is complete (``ok`` or ``diverged``): skipped unless ``force``."""
    if force:
        return set()
    return {run.run_id for run in runs if is_current(read_record(record_path(results_dir, suite.name, run.run_id)),
                                                                run.shared_with)}


def select_runs(runs: list[RunSpec], run_ids: list[str] | None, where: Path) -> list[RunSpec]:
    """The runs named by ``--run-id`` (all when None), in expansion order."""
    if run_ids is None:
        return runs
    known = {run.run_id for run in runs}
    unknown = [run_id for run_id in run_ids if run_id not in known]
    if unknown:
        raise UserError(f"{where}: --run-id {unknown[0]}: no run of this tier has that id")
    return [run for run in runs if run.run_id in run_ids]


def report_outcome(summary: SuiteRunSummary, run: RunSpec, prefix: str, outcome: RunOutcome, error: str | None,
                   echo: Callable[[str], None]) -> None:
    """Add a finished run to the summary and print its one line."""
    if outcome.status == "stopped":
        summary.stopped.append(run.run_id)
        echo(f"{prefix}: stopped at the deadline; its training state is saved and the next run resumes it")
        return
    if outcome.status == "locked":
        summary.skipped.append(run.run_id)
        summary.locked.append(run.run_id)
        echo(f"{prefix}: not run: {error}")
        return
    summary.ran.append(run.run_id)
    if outcome.extra.get("provenance"):
        prefix = f"{prefix} (provenance: {outcome.extra['provenance']})"
    if outcome.status == "failed":
        summary.failed.append(run.run_id)
        echo(f"{prefix}: FAILED: {error.splitlines()[0] if error else ''}")
    elif outcome.status == "diverged":
        summary.diverged.append(run.run_id)
        echo(f"{prefix}: diverged at step {outcome.diverged_step}")
    else:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in outcome.metrics.items() if isinstance(v, float))
        shared_from = outcome.extra.get("shared_from")
        how = f"shared with {shared_from}" if shared_from else f"in {outcome.wall_time_s:.1f}s"
        collapsed = " COLLAPSED (chance accuracy, loss near ln C)" if outcome.extra.get("collapsed") else ""
        echo(f"{prefix}: ok {how}{collapsed}: {shown}")


def execute_suite(executor: Executor, request: SuiteRequest, echo: Callable[[str], None] = print,
                  data_parallel: DataParallel | None = None) -> SuiteRunSummary:
    """``repro run``'s loop over any executor: every selected run without a complete record goes to ``executor``;
    a run that reports another's numbers goes when that run has ended, so that it copies its record.

    ``data_parallel``: this process is one of torchrun's; every process runs this loop in step over the same runs
    (``executor`` runs them in this process), and only rank 0 prints and writes records.
    """
    suite, path, runs = expand_tier(request.suite, request.tier)
    runs = select_runs(runs, None if request.run_ids is None else list(request.run_ids), path)
    is_main = data_parallel is None or data_parallel.is_main
    if is_main:
        check_writable(request.results_dir / "runs" / suite.name, f"--results {request.results_dir}")
    else:
        echo = _silent
    device = resolve_device(request.device) if data_parallel is None else data_parallel.device
    complete = complete_run_ids(suite, runs, request.results_dir, request.force)
    echo(f"suite {suite.name} v{suite.version}, tier {request.tier}: {len(runs)} runs ({len(complete)} complete) "
         f"{executor.placement(device)} -> {request.results_dir}")
    summary = SuiteRunSummary(suite.name, request.tier)
    prefixes = {run.run_id: f"[{index}/{len(runs)}] {run.label}" for index, run in enumerate(runs, 1)}
    for run in runs:
        if run.run_id in complete:
            summary.skipped.append(run.run_id)
            echo(f"{prefixes[run.run_id]}: complete, skipped ({run.run_id}.json)")
    pending = {run.run_id: run for run in runs if run.run_id not in complete}
    followers: dict[str, list[RunSpec]] = {}
    for run in pending.values():
        if run.shared_with in pending:
            followers.setdefault(run.shared_with, []).append(run)
    executor.expect(len(pending))
    with executor:
        handles = executor.submit(request, [run for run in pending.values() if run.shared_with not in pending])
        while handles:
            for handle in executor.wait(handles):
                handles.remove(handle)
                handles[:0] = executor.submit(request, followers.pop(handle.run.run_id, []))  # next, in order
                result, prefix = handle.result(), prefixes[handle.run.run_id]
                if result is None:
                    summary.skipped.append(handle.run.run_id)
                    echo(f"{prefix}: completed by another process meanwhile; skipped")
                elif is_main:
                    report_outcome(summary, handle.run, prefix, *result, echo)
                else:
                    summary.ran.append(handle.run.run_id)
    return summary


def _silent(_: str) -> None:
    """What a process other than torchrun's rank 0 prints."""
