"""The executor interface: what to run (a ``SuiteRequest``), independent of where an ``Executor`` runs it."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from repro.execute.runner import SuiteRunSummary


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


class Executor(Protocol):
    """Places a request's pending runs: in this process, on local workers, or as cluster jobs.

    Every executor skips runs with a complete record (unless ``force``) and has each run's record written by
    whoever ran it, through ``repro.execute.runner.RunRecorder``.
    """

    def run(self, request: SuiteRequest, echo: Callable[[str], None] = print) -> SuiteRunSummary: ...
