"""Local executors: the sequential loop of ``repro run`` (runs in this process), and ``--workers K`` processes
running runs at once.

Workers are spawned processes. Each is pinned to one GPU (``CUDA_VISIBLE_DEVICES``, round-robin over the visible
ones) or shares the one device; small models at 28 px leave a large GPU mostly idle, so several runs fill it.
A worker runs a run exactly as the sequential loop does (``RunRecorder``) and writes its record, so run ids and
records are the same. On CPU the workers split the parent's threads; numbers equal a sequential run at the same
per-process thread count.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro.execute.base import ExecutorLost, RunResult, SuiteRequest
from repro.execute.runner import RunRecorder, SuiteRunSummary, execute_suite, expand_tier, resolve_device
from repro.process import keep_freed_memory
from repro.tasks.base import RunContext, RunSpec
from repro.train.distributed import DataParallel


class RunRecorders:
    """One process's recorders: one context per place runs go (its datasets stay loaded), one recorder per suite
    and tier."""

    def __init__(self, data_parallel: DataParallel | None = None) -> None:
        self.data_parallel = data_parallel
        self._contexts: dict[tuple, RunContext] = {}
        self._recorders: dict[tuple, tuple[RunRecorder, dict[str, RunSpec]]] = {}

    def recorder(self, request: SuiteRequest, sharing: int, seconds_left: float | None
                 ) -> tuple[RunRecorder, dict[str, RunSpec]]:
        """The recorder of the request's suite and tier, and its runs by id. ``seconds_left`` is a deadline, sent
        as the time left since clocks are per process."""
        where = (request.device, request.results_dir, request.data_dir, request.force, request.checkpoint_every_s,
                 request.progress, sharing)
        if where not in self._contexts:
            parallel = self.data_parallel
            self._contexts[where] = RunContext(
                resolve_device(request.device) if parallel is None else parallel.device, request.results_dir,
                request.data_dir, progress=request.progress and (parallel is None or parallel.is_main),
                data_parallel=parallel, retrain=request.force, checkpoint_every_s=request.checkpoint_every_s,
                runs_sharing_device=sharing)
        ctx = self._contexts[where]
        ctx.deadline = None if seconds_left is None else ctx.clock() + seconds_left
        key = (request.suite, request.tier, where)
        if key not in self._recorders:
            suite, path, runs = expand_tier(request.suite, request.tier)
            self._recorders[key] = RunRecorder(suite, path, request.tier, ctx), {run.run_id: run for run in runs}
        return self._recorders[key]


@dataclass(eq=False)
class PendingRun:
    """A run of the sequential executor: it runs in this process when it is first waited for, as submitit's
    debug executor runs a job."""

    run: RunSpec
    start: Callable[[], RunResult]
    state: str = "pending"  # pending, done or cancelled
    outcome: RunResult = None

    def done(self) -> bool:
        return self.state != "pending"

    def result(self) -> RunResult:
        if self.state == "cancelled":
            raise concurrent.futures.CancelledError(f"run {self.run.run_id} was cancelled before it started")
        if self.state == "pending":
            self.outcome, self.state = self.start(), "done"
        return self.outcome

    def cancel(self) -> bool:
        if self.state == "pending":
            self.state = "cancelled"
        return self.state == "cancelled"


@dataclass
class SequentialExecutor:
    """Runs one after another in this process, in the order submitted (in step with the other processes under
    torchrun when ``data_parallel`` is set)."""

    data_parallel: DataParallel | None = None
    slots = 1
    runs_here = True
    _recorders: RunRecorders = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._recorders = RunRecorders(self.data_parallel)

    def expect(self, runs: int) -> None:
        """Nothing to start: runs go in this process."""

    def submit(self, request: SuiteRequest, runs: Sequence[RunSpec], seconds_left: float | None = None
               ) -> list[PendingRun]:
        return [PendingRun(run, functools.partial(self._run, request, run, seconds_left)) for run in runs]

    def _run(self, request: SuiteRequest, run: RunSpec, seconds_left: float | None) -> RunResult:
        recorder, _ = self._recorders.recorder(request, 1, seconds_left)
        return recorder.run(run)

    def wait(self, handles: Collection[PendingRun], timeout: float | None = None) -> list[PendingRun]:
        """The done handles, else the first submitted, run now (a run in this process cannot be timed out)."""
        done = [handle for handle in handles if handle.done()]
        if done:
            return done
        first = next(iter(handles))
        first.result()
        return [first]

    def placement(self, device: torch.device) -> str:
        parallel = self.data_parallel
        return f"on {device}" + ("" if parallel is None else f" x {parallel.world_size} processes")

    def __enter__(self) -> SequentialExecutor:
        return self

    def __exit__(self, *error: object) -> None:
        """Nothing to release: a run ends before the next starts."""


@dataclass(eq=False)
class WorkerRun:
    """A run on a worker process: its future."""

    run: RunSpec
    future: concurrent.futures.Future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunResult:
        try:
            return self.future.result()
        except concurrent.futures.process.BrokenProcessPool as err:
            raise ExecutorLost("a worker process died (killed, out of memory)") from err

    def cancel(self) -> bool:
        return self.future.cancel()


@dataclass
class WorkerExecutor:
    """``workers`` spawned processes, each running whole runs (see the module docstring). The processes start at
    the first submission and stop when the executor is left."""

    workers: int
    runs_here = True
    _processes: int = field(init=False, repr=False)
    _pool: concurrent.futures.ProcessPoolExecutor | None = field(default=None, init=False, repr=False)
    _sharing: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        self._processes = self.workers

    @property
    def slots(self) -> int:
        return self.workers

    def expect(self, runs: int) -> None:
        """Fewer runs than workers start as many processes as runs, each with its share of the CPU threads."""
        self._processes = max(1, min(self.workers, runs))

    def submit(self, request: SuiteRequest, runs: Sequence[RunSpec], seconds_left: float | None = None
               ) -> list[WorkerRun]:
        if self._pool is None and runs:
            device = resolve_device(request.device)
            gpus = visible_gpus() if device.type == "cuda" else []
            self._pool = worker_pool(self._processes, gpus)
            self._sharing = runs_per_device(self._processes, gpus)
        return [WorkerRun(run, self._pool.submit(run_in_worker, request, run.run_id, self._sharing, seconds_left))
                for run in runs]

    def wait(self, handles: Collection[WorkerRun], timeout: float | None = None) -> list[WorkerRun]:
        by_future = {handle.future: handle for handle in handles}
        done, _ = concurrent.futures.wait(by_future, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return [by_future[future] for future in done]

    def placement(self, device: torch.device) -> str:
        gpus = visible_gpus() if device.type == "cuda" else []
        return f"on {self._processes} workers, " + (f"{len(gpus)} GPUs" if gpus else str(device))

    def __enter__(self) -> WorkerExecutor:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *error: object) -> None:
        """Wait for the runs in flight; on an error, cancel the ones not started and do not wait."""
        if self._pool is not None:
            self._pool.shutdown(wait=error_type is None, cancel_futures=error_type is not None)
            self._pool = None


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


def worker_pool(workers: int, gpus: list[str]) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` spawned processes, each pinned to one of ``gpus`` (round-robin) or sharing the one device, with
    their share of this process's CPU threads."""
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                  initargs=(context.Value("i", 0), gpus, threads))


#: in a worker process: its recorders
_IN_WORKER = RunRecorders()


def run_in_worker(request: SuiteRequest, run_id: str, sharing: int, seconds_left: float | None = None) -> RunResult:
    """One run in a worker process, exactly as the sequential loop runs it (no progress bars: the processes would
    print over each other)."""
    recorder, runs_by_id = _IN_WORKER.recorder(dataclasses.replace(request, progress=False), sharing, seconds_left)
    return recorder.run(runs_by_id[run_id])


def run_suite(suite_ref: str | Path, tier: str, *, device: str = "auto", results_dir: Path = Path("results"),
              force: bool = False, data_dir: Path | None = None, progress: bool = True,
              echo: Callable[[str], None] = print, data_parallel: DataParallel | None = None,
              run_ids: list[str] | None = None, checkpoint_every_s: float | None = None) -> SuiteRunSummary:
    """A suite's pending runs, one after another in this process."""
    request = SuiteRequest(str(suite_ref), tier, device, results_dir, data_dir, force, progress,
                           run_ids=None if run_ids is None else tuple(run_ids), checkpoint_every_s=checkpoint_every_s)
    return execute_suite(SequentialExecutor(data_parallel), request, echo, data_parallel)


def run_workers(request: SuiteRequest, workers: int, echo: Callable[[str], None] = print) -> SuiteRunSummary:
    """A suite's pending runs on ``workers`` spawned processes (one process per run, so ``request.nproc`` is 1)."""
    return execute_suite(WorkerExecutor(workers), request, echo)
