"""The executor interface: what to run (a ``SuiteRequest``), independent of where an ``Executor`` runs it, and
the handle an executor returns for each run it takes."""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from repro.tasks.base import RunOutcome, RunSpec


@dataclass(frozen=True)
class SuiteRequest:
    """The options of ``repro run`` that decide what runs and how a run computes (not where it runs)."""

    suite: str
    tier: str = "smoke"
    device: str = "auto"
    results_dir: Path = Path("results")
    data_dir: Path | None = None
    force: bool = False
    progress: bool = True
    nproc: int = 1
    run_ids: tuple[str, ...] | None = None
    #: seconds between resumable training states, so a preempted or killed run continues (repro.train.resume)
    checkpoint_every_s: float | None = None

    def run_command(self, suite_path: Path, run_id: str, python: str) -> list[str]:
        """The ``repro run`` command line that runs ``run_id`` alone in a fresh process (a cluster job).

        Paths are absolute because a job may start in another folder; ``--force`` is kept so a forced
        resubmission reruns a run that has a complete record.
        """
        command = [*shlex.split(python), "-m", "repro", "run", str(suite_path.resolve()), "--tier", self.tier,
                   "--run-id", run_id, "--device", self.device, "--results", str(self.results_dir.resolve()),
                   "--no-progress"]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir.resolve())]
        if self.nproc > 1:
            command += ["--nproc", str(self.nproc)]
        if self.force:
            command.append("--force")
        if self.checkpoint_every_s is not None:
            command += ["--checkpoint-every", f"{self.checkpoint_every_s:g}s"]
        return command


#: what running a run gives: its outcome and error, or None when another process completed it meanwhile
RunResult = tuple["RunOutcome", str | None] | None


class ExecutorLost(RuntimeError):
    """The executor can run nothing more (a worker process died): the runs it held have no record."""


class RunHandle(Protocol):
    """One submitted run, as a submitit job is one submitted function: ask whether it has ended, wait for its
    result, or cancel it."""

    run: RunSpec

    def done(self) -> bool: ...

    def result(self) -> RunResult:
        """Wait for the run to end; raises ``ExecutorLost`` when what ran it died."""
        ...

    def cancel(self) -> bool:
        """Stop the run if this executor can (a queued or running job; a run not yet started); whether it did."""
        ...


class Executor(Protocol):
    """Takes runs and returns one handle per run: in this process, on local worker processes, or as cluster jobs.

    Whoever runs a run writes its record, through ``repro.execute.runner.RunRecorder``, so run ids and records do
    not depend on the executor. An executor is a context manager: leaving it releases what it started (a process
    pool) and cancels what has not started when an error leaves it.
    """

    #: how many runs it runs at once; callers keep no more than this many submitted and not done
    slots: int
    #: whether runs go to processes of this machine, so that the device is resolved here
    runs_here: bool

    def expect(self, runs: int) -> None:
        """At most ``runs`` runs will be submitted in all: an executor that starts processes starts no more."""
        ...

    def submit(self, request: SuiteRequest, runs: Sequence[RunSpec], seconds_left: float | None = None
               ) -> list[RunHandle]:
        """Start ``runs`` of ``request``'s suite and tier (ordered as given). ``seconds_left``: a deadline, by which
        training stops with a resumable state, where the executor can pass it to the run."""
        ...

    def wait(self, handles: Collection[RunHandle], timeout: float | None = None) -> list[RunHandle]:
        """Block until at least one of ``handles`` is done (or ``timeout`` seconds passed); the done ones."""
        ...

    def placement(self, device: torch.device | None) -> str:
        """Where runs go, for the line that starts a suite: ``on cpu``, ``on 2 workers, 2 GPUs``, ``as slurm jobs``
        (``device``: None where runs do not go here)."""
        ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *error: object) -> None: ...
