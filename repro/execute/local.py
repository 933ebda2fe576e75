"""Local executors: the sequential loop of ``repro run``, and ``--workers K`` processes running runs at once.

Workers are spawned processes. Each is pinned to one GPU (``CUDA_VISIBLE_DEVICES``, round-robin over the visible
ones) or shares the one device; small models at 28 px leave a large GPU mostly idle, so several runs fill it.
A worker runs a run exactly as the sequential loop does (``RunRecorder``) and writes its record, so run ids and
records are the same. On CPU the workers split the parent's threads; numbers equal a sequential run at the same
per-process thread count.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from repro.execute.base import SuiteRequest
from repro.execute.runner import (
    RunRecorder,
    SuiteRunSummary,
    complete_run_ids,
    expand_tier,
    report_outcome,
    resolve_device,
    run_suite,
    select_runs,
)
from repro.process import keep_freed_memory
from repro.tasks.base import RunContext, RunOutcome
from repro.train.distributed import DataParallel

#: per worker process: one context per place runs go (its datasets stay loaded), one recorder per suite and tier
_CONTEXTS: dict[tuple, RunContext] = {}
_RECORDERS: dict[tuple, tuple[RunRecorder, dict]] = {}


@dataclass(frozen=True)
class SequentialExecutor:
    """Today's loop: every pending run, one after another, in this process (in step with the other processes
    under torchrun when ``data_parallel`` is set)."""

    data_parallel: DataParallel | None = None

    def run(self, request: SuiteRequest, echo: Callable[[str], None] = print) -> SuiteRunSummary:
        return run_sequential(request, echo, self.data_parallel)


@dataclass(frozen=True)
class WorkerExecutor:
    """``workers`` spawned processes, each running whole runs (see the module docstring)."""

    workers: int

    def run(self, request: SuiteRequest, echo: Callable[[str], None] = print) -> SuiteRunSummary:
        return run_workers(request, self.workers, echo)


def run_sequential(request: SuiteRequest, echo: Callable[[str], None] = print,
                   data_parallel: DataParallel | None = None) -> SuiteRunSummary:
    return run_suite(request.suite, request.tier, device=request.device, results_dir=request.results_dir,
                     force=request.force, data_dir=request.data_dir, progress=request.progress, echo=echo,
                     data_parallel=data_parallel, run_ids=None if request.run_ids is None else list(request.run_ids),
                     checkpoint_every_s=request.checkpoint_every_s)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry for entry in listed.split(",") if entry.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def _start_worker(counter, gpus: list[str], threads: int) -> None:
    """Pin this worker to its GPU before CUDA starts, and give it its share of the CPU threads and the memory
    settings of every repro process (``repro.process``)."""
    keep_freed_memory()
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    torch.set_num_threads(threads)


def runs_per_device(workers: int, gpus: list[str]) -> int:
    """How many of ``workers`` processes share one device: all of them on CPU or one GPU, else round-robin."""
    return -(-workers // len(gpus)) if gpus else workers


@contextlib.contextmanager
def worker_pool(workers: int, device: torch.device) -> Iterator[tuple[concurrent.futures.ProcessPoolExecutor, int]]:
    """``workers`` spawned processes, each pinned to a GPU (round-robin) or sharing the one device, with their share
    of this process's CPU threads; and how many of them share a device. Pending work is cancelled on an error."""
    gpus = visible_gpus() if device.type == "cuda" else []
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=(context.Value("i", 0), gpus, threads)) as pool:
        try:
            yield pool, runs_per_device(workers, gpus)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def run_in_worker(request: SuiteRequest, run_id: str, sharing: int, seconds_left: float | None = None
                  ) -> tuple[str, tuple[RunOutcome, str | None] | None]:
    """One run in a worker process, exactly as the sequential loop runs it. ``seconds_left`` is a campaign's
    deadline, sent as the time left since clocks are per process."""
    where = (request.device, request.results_dir, request.data_dir, request.force, request.checkpoint_every_s, sharing)
    if where not in _CONTEXTS:
        _CONTEXTS[where] = RunContext(resolve_device(request.device), request.results_dir, request.data_dir,
                                      progress=False, retrain=request.force,
                                      checkpoint_every_s=request.checkpoint_every_s, runs_sharing_device=sharing)
    ctx = _CONTEXTS[where]
    ctx.deadline = None if seconds_left is None else ctx.clock() + seconds_left
    key = (request.suite, request.tier, where)
    if key not in _RECORDERS:
        suite, path, runs = expand_tier(request.suite, request.tier)
        _RECORDERS[key] = RunRecorder(suite, path, request.tier, ctx), {run.run_id: run for run in runs}
    recorder, runs_by_id = _RECORDERS[key]
    return run_id, recorder.run(runs_by_id[run_id])


def run_workers(request: SuiteRequest, workers: int, echo: Callable[[str], None] = print) -> SuiteRunSummary:
    """Run the pending runs on ``workers`` spawned processes (one process per run, so ``request.nproc`` is 1);
    records as the sequential loop writes them."""
    suite, path, runs = expand_tier(request.suite, request.tier)
    runs = select_runs(runs, None if request.run_ids is None else list(request.run_ids), path)
    device = resolve_device(request.device)
    gpus = visible_gpus() if device.type == "cuda" else []
    summary = SuiteRunSummary(suite.name, request.tier)
    complete = complete_run_ids(suite, runs, request.results_dir, request.force)
    pending = [run for run in runs if run.run_id not in complete]
    summary.skipped.extend(run.run_id for run in runs if run.run_id in complete)
    placement = f"{len(gpus)} GPUs" if gpus else str(device)
    echo(f"suite {suite.name} v{suite.version}, tier {request.tier}: {len(runs)} runs ({len(complete)} complete) "
         f"on {workers} workers, {placement} -> {request.results_dir}")
    if not pending:
        return summary
    by_id = {run.run_id: run for run in pending}
    # a run that reports another's numbers starts when that run has ended, so that it copies its record
    followers: dict[str, list] = {}
    for run in pending:
        if run.shared_with in by_id:
            followers.setdefault(run.shared_with, []).append(run)
    with worker_pool(min(workers, len(pending)), device) as (pool, sharing):
        running = {pool.submit(run_in_worker, request, run.run_id, sharing)
                   for run in pending if run.shared_with not in by_id}
        done = 0
        while running:
            finished, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run_id, result = future.result()
                running |= {pool.submit(run_in_worker, request, follower.run_id, sharing)
                            for follower in followers.pop(run_id, ())}
                done += 1
                run, prefix = by_id[run_id], f"[{done}/{len(pending)}] {by_id[run_id].label}"
                if result is None:
                    summary.skipped.append(run_id)
                    echo(f"{prefix}: completed by another process meanwhile; skipped")
                    continue
                report_outcome(summary, run, prefix, *result, echo)
    return summary
