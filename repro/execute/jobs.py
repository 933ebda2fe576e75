"""Cluster job state: one file per submitted run at ``RESULTS/jobs/<suite>/<run_id>.json``, and each run's state.

The state file says which job runs a run and where its log is. With the run's record it gives the run's state:
``queued`` or ``running`` while the scheduler lists the job, else the record's status (``ok``, ``failed``,
``diverged``), else ``failed`` when the job ended without a record (killed, out of memory: see its log), else
``pending``. A resubmission skips queued and running runs, so submitting twice starts nothing new.
"""

from __future__ import annotations

import datetime
import getpass
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.errors import UserError
from repro.store.atomic import write_json_atomic
from repro.store.records import read_record, record_path
from repro.tasks.base import RunSpec

RUN_STATES = ("pending", "queued", "running", "ok", "failed", "diverged")
#: the states of a run whose job the scheduler still lists
ACTIVE_STATES = ("queued", "running")
#: squeue's job states, as this module names them; a job squeue no longer lists has ended
_SQUEUE_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}


def jobs_dir(results_dir: Path, suite: str) -> Path:
    return results_dir / "jobs" / suite


def job_file(results_dir: Path, suite: str, run_id: str) -> Path:
    return jobs_dir(results_dir, suite) / f"{run_id}.json"


def log_path(results_dir: Path, suite: str, run_id: str) -> Path:
    """A run's job log (stdout and stderr of every attempt), named by run id."""
    return jobs_dir(results_dir, suite) / "logs" / f"{run_id}.log"


@dataclass(frozen=True)
class JobEntry:
    run_id: str
    job_id: str
    scheduler: str
    log: str
    submitted_at: str
    command: list[str]

    def write(self, results_dir: Path, suite: str) -> None:
        write_json_atomic(job_file(results_dir, suite, self.run_id), self.__dict__)


def new_entry(run_id: str, job_id: str, scheduler: str, log: Path, command: list[str]) -> JobEntry:
    submitted = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return JobEntry(run_id, job_id, scheduler, str(log), submitted, command)


def read_entry(results_dir: Path, suite: str, run_id: str) -> JobEntry | None:
    """The run's job file; None when there is none or it is not one (a job file is not a run record)."""
    try:
        return JobEntry(**json.loads(job_file(results_dir, suite, run_id).read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


def _slurm_states() -> dict[str, str]:
    """This user's jobs that Slurm still lists (array tasks one per line), as ``queued`` or ``running``."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %T"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    except FileNotFoundError as err:
        raise UserError("repro status: squeue not found; run it on the cluster's login node") from err
    except subprocess.SubprocessError as err:
        raise UserError(f"repro status: squeue failed: {err}") from err
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = "running" if parts[1] in _SQUEUE_RUNNING else "queued"
    return states


def _local_state(job_id: str) -> str | None:
    """submitit's local stand-in: the job is its controller process; running while that process lives (and is
    still submitit's controller, not another process that got the id)."""
    try:
        proc = Path(f"/proc/{int(job_id)}")
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        command = (proc / "cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") or b"submitit.local._local" not in command else "running"


def scheduler_states(entries: list[JobEntry]) -> dict[str, str]:
    """Job id -> ``queued`` or ``running`` for the jobs still alive; ended jobs are absent."""
    states: dict[str, str] = {}
    if any(entry.scheduler == "slurm" for entry in entries):
        states.update(_slurm_states())
    for entry in entries:
        if entry.scheduler == "local" and (state := _local_state(entry.job_id)):
            states[entry.job_id] = state
    return states


@dataclass(frozen=True)
class RunState:
    run: RunSpec
    state: str
    job_id: str = ""
    log: str = ""


def run_states(suite: str, runs: list[RunSpec], results_dir: Path) -> list[RunState]:
    """Every run's state, from its record, its job state file and the scheduler (see the module docstring)."""
    entries = {run.run_id: read_entry(results_dir, suite, run.run_id) for run in runs}
    alive = scheduler_states([entry for entry in entries.values() if entry is not None])
    states = []
    for run in runs:
        entry = entries[run.run_id]
        record: dict[str, Any] | None = read_record(record_path(results_dir, suite, run.run_id))
        job_id, log = (entry.job_id, entry.log) if entry else ("", "")
        if entry is not None and entry.job_id in alive:
            state = alive[entry.job_id]
        elif record is not None and record.get("status") in RUN_STATES:
            state = record["status"]
        elif entry is not None:
            state = "failed"
        else:
            state = "pending"
        states.append(RunState(run, state, job_id, log))
    return states


def status_lines(states: list[RunState]) -> list[str]:
    """``repro status``: one line per run (state, run id, setting, job id and log), then the count per state."""
    lines = [f"{s.state:<9} {s.run.run_id}  {s.run.label}" + (f"  job {s.job_id}  {s.log}" if s.job_id else "")
             for s in states]
    lines.append(", ".join(f"{sum(s.state == name for s in states)} {name}" for name in RUN_STATES))
    return lines
