"""Slurm executor through submitit: one job per run, in job arrays with a concurrency limit; a handle per job.

Each job runs ``repro run SUITE --run-id ID`` in a child process, with stdout and stderr appended to
``RESULTS/jobs/<suite>/logs/<run_id>.log``; a run with ``--nproc N`` becomes one job with N GPUs, in which
``repro run`` starts torchrun. On preemption or time-out submitit asks the job to checkpoint and requeues it
(same job id); the run starts again and continues from its checkpoint when it saves one. Its record is written
once, when the run ends, by the job that ran it.

``scheduler: local`` in the cluster block swaps Slurm for submitit's local executor (each job a local process):
the stand-in the tests use, and a way to try a cluster setup on a workstation. submitit is an optional extra
(``pip install 'repro[slurm]'``), imported only here and only when jobs are submitted.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from repro.errors import UserError, printable
from repro.execute.base import RunResult, SuiteRequest
from repro.execute.job import RunJob
from repro.execute.jobs import ACTIVE_STATES, jobs_dir, log_path, new_entry, run_states
from repro.execute.runner import (
    SuiteRunSummary,
    check_data_parallel,
    complete_run_ids,
    expand_tier,
    select_runs,
)
from repro.store.records import read_record, record_path
from repro.suite.load import format_validation_error, load_suite
from repro.tasks.base import RunOutcome, RunSpec

#: C0 and C1 control characters and DEL: a newline in a value would end an ``#SBATCH`` line and start a shell line
#: in the script's header (sbatch stops reading options there)
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _one_line(value: str) -> str:
    if CONTROL_CHARACTER.search(value):
        raise ValueError(f"{value!r} holds a control character; allowed: one line of text")
    return value


class ClusterConfig(BaseModel):
    """The ``cluster:`` block of a user's file (not of a suite: suites stay portable across clusters)."""

    model_config = ConfigDict(extra="forbid")
    scheduler: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    #: minutes per job; a run that needs longer is requeued on time-out (up to max_requeues)
    time: int = Field(1440, ge=1)
    #: GPUs per job when a run uses one process; a run with --nproc N gets N
    gpus_per_node: int = Field(1, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: at most this many array tasks run at once
    array_parallelism: int = Field(64, ge=1)
    #: false: one job per run instead of one array per submission
    array: bool = True
    max_requeues: int = Field(3, ge=0)
    #: extra sbatch options, e.g. {account: mylab, qos: high, constraint: a100}
    sbatch_options: dict[str, str | int | bool] = Field(default_factory=dict)
    #: shell lines run in the job before repro (module load, source a venv)
    setup: list[str] = Field(default_factory=list)
    #: the Python that runs repro in the job (default: this one; the file system is shared)
    python: str | None = None

    @field_validator("partition", "python")
    @classmethod
    def _text_is_one_line(cls, value: str | None) -> str | None:
        return value if value is None else _one_line(value)

    @field_validator("setup")
    @classmethod
    def _lines_are_lines(cls, lines: list[str]) -> list[str]:
        return [_one_line(line) for line in lines]

    @field_validator("sbatch_options")
    @classmethod
    def _options_are_sbatch_lines(cls, options: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        for key, value in options.items():
            if not SBATCH_KEY.fullmatch(key):
                raise ValueError(f"key {key!r} holds a control character or is no sbatch option name; "
                                 "allowed: letters, digits, - and _")
            if value is False:
                raise ValueError(f"{key}: false is no sbatch value; leave the option out (true gives a bare flag, "
                                 "such as --exclusive)")
            if isinstance(value, str):
                _one_line(value)
        return options


class _ClusterFile(BaseModel):
    cluster: ClusterConfig


def load_cluster_file(path: Path) -> ClusterConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read the cluster file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict) or "cluster" not in raw:
        raise UserError(f"{path}: field cluster: required but missing (a mapping of partition, time, ...)")
    try:
        return _ClusterFile.model_validate({"cluster": raw["cluster"]}).cluster
    except ValidationError as err:
        raise UserError(format_validation_error(path, err, _ClusterFile)) from None


#: the ``repro run`` flag of each cluster field that a flag sets
CLUSTER_FLAGS = {"partition": "--partition", "time": "--time", "gpus_per_node": "--gpus-per-node",
                 "cpus_per_task": "--cpus-per-task", "mem_gb": "--mem", "sbatch_options": "--sbatch-option"}


def cluster_config(path: Path | None, overrides: dict[str, Any]) -> ClusterConfig:
    """The cluster file's block (or the defaults) with the command line's flags on top."""
    base = load_cluster_file(path) if path is not None else ClusterConfig()
    given = {key: value for key, value in overrides.items() if value is not None and value != {}}
    if "sbatch_options" in given:
        given["sbatch_options"] = {**base.sbatch_options, **given["sbatch_options"]}
    try:
        return ClusterConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{CLUSTER_FLAGS[first['loc'][0]]}: {first['msg']}") from None


def parse_sbatch_options(options: list[str]) -> dict[str, str | bool]:
    """``--sbatch-option account=mylab`` (or a bare flag such as ``exclusive``) -> {"account": "mylab"}."""
    parsed: dict[str, str | bool] = {}
    for option in options:
        key, sep, value = option.removeprefix("--").partition("=")
        if not key:
            raise UserError(f"--sbatch-option {option!r}: expected KEY=VALUE or KEY")
        parsed[key] = value if sep else True
    return parsed


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install 'repro[slurm]'") from None
    return submitit


def _python(cluster: ClusterConfig) -> str:
    return cluster.python or shlex.quote(sys.executable)


def slurm_parameters(cluster: ClusterConfig, gpus: int, job_name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (sbatch's names) for one job of a run."""
    params: dict[str, Any] = {
        "job_name": job_name, "time": cluster.time, "nodes": 1, "ntasks_per_node": 1,
        "array_parallelism": cluster.array_parallelism, "stderr_to_stdout": True,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if cluster.partition:
        params["partition"] = cluster.partition
    if cluster.cpus_per_task:
        params["cpus_per_task"] = cluster.cpus_per_task
    if cluster.mem_gb:
        params["mem"] = f"{cluster.mem_gb:g}GB"
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    if cluster.sbatch_options:
        params["additional_parameters"] = dict(cluster.sbatch_options)
    return params


def sbatch_script(cluster: ClusterConfig, folder: Path, gpus: int, job_name: str, array_size: int | None) -> str:
    """The sbatch script submitit writes for an array of ``array_size`` runs (None: one job)."""
    _import_submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{_python(cluster)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size,
                               **slurm_parameters(cluster, gpus, job_name))


def _executor(cluster: ClusterConfig, folder: Path, gpus: int, job_name: str):
    submitit = _import_submitit()
    if cluster.scheduler == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=cluster.max_requeues, python=_python(cluster))
        executor.update_parameters(timeout_min=cluster.time, gpus_per_node=gpus, setup=list(cluster.setup))
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=cluster.max_requeues, python=_python(cluster))
    except RuntimeError as err:
        raise UserError(f"--executor slurm: {err}") from None
    executor.update_parameters(**slurm_parameters(cluster, gpus, job_name))
    return executor


def jobs_folder(results_dir: Path, suite: str) -> Path:
    """Where submitit keeps a suite's job files: named in the sbatch script's ``#SBATCH`` lines, so it may hold no
    control character."""
    results = str(results_dir.resolve())
    if CONTROL_CHARACTER.search(results):
        raise UserError(f"--results {printable(results)}: holds a control character; allowed: a path without them")
    return (jobs_dir(results_dir, suite) / "submitit").resolve()


def job_gpus(request: SuiteRequest, cluster: ClusterConfig) -> int:
    """GPUs per job: none on CPU, one per process of a data-parallel run, else the cluster's."""
    return 0 if request.device == "cpu" else request.nproc if request.nproc > 1 else cluster.gpus_per_node


def recorded_result(results_dir: Path, suite: str, run: RunSpec, job_id: str, log: Path) -> RunResult:
    """An ended job's outcome, from the record its run wrote; ``failed`` when it wrote none (killed, out of
    memory)."""
    record = read_record(record_path(results_dir, suite, run.run_id), warn=False)
    if record is None or record.get("status") not in ("ok", "failed", "diverged"):
        return RunOutcome("failed", {}, 0.0), f"job {job_id} ended without a record; see its log {log}"
    fields = {name: record.get(name) for name in ("images_per_s", "peak_memory_mb", "diverged_step")}
    return RunOutcome(record["status"], record.get("metrics") or {}, record.get("wall_time_s") or 0.0,
                      curve=record.get("curve") or [], rows=record.get("rows") or [], extra=record.get("extra") or {},
                      **fields), record.get("error")


@dataclass(eq=False)
class SlurmJob:
    """A run's job: done when the scheduler no longer lists it; its result is the record it wrote."""

    run: RunSpec
    suite: str
    results_dir: Path
    job: Any  # submitit's Job
    log: Path
    poll_s: float

    def done(self) -> bool:
        (state,) = run_states(self.suite, [self.run], self.results_dir)
        return state.state not in ACTIVE_STATES

    def result(self) -> RunResult:
        while not self.done():
            time.sleep(self.poll_s)
        return recorded_result(self.results_dir, self.suite, self.run, str(self.job.job_id), self.log)

    def cancel(self) -> bool:
        """``scancel`` (or, for the local stand-in, an interrupt): the run leaves no record, and its last saved
        training state for the next run to continue."""
        if self.done():
            return False
        self.job.cancel(check=False)
        return True


@dataclass
class SlurmExecutor:
    """One job per run through submitit (``cluster.scheduler``: Slurm, or submitit's local stand-in); waiting
    asks the scheduler every ``poll_s`` seconds."""

    cluster: ClusterConfig
    poll_s: float = 30.0
    runs_here = False

    @property
    def slots(self) -> int:
        return self.cluster.array_parallelism

    def expect(self, runs: int) -> None:
        """Nothing to start: jobs wait in the scheduler's queue."""

    def submit(self, request: SuiteRequest, runs: Sequence[RunSpec], seconds_left: float | None = None
               ) -> list[SlurmJob]:
        """One job per run, in one array when ``cluster.array``; each run's job file names its job. A job has no
        deadline: a caller with one waits until it and cancels the jobs still running."""
        if not runs:
            return []
        suite, path = load_suite(request.suite)
        folder, gpus = jobs_folder(request.results_dir, suite.name), job_gpus(request, self.cluster)
        executor = _executor(self.cluster, folder, gpus, f"repro-{suite.name}")
        commands = [request.run_command(path, run.run_id, _python(self.cluster)) for run in runs]
        logs = [log_path(request.results_dir, suite.name, run.run_id).resolve() for run in runs]
        jobs_of = [RunJob(command, log) for command, log in zip(commands, logs, strict=True)]
        if self.cluster.array:
            with executor.batch():
                jobs = [executor.submit(job) for job in jobs_of]
        else:
            jobs = [executor.submit(job) for job in jobs_of]
        for run, job, command, log in zip(runs, jobs, commands, logs, strict=True):
            new_entry(run.run_id, str(job.job_id), self.cluster.scheduler, log, command).write(request.results_dir,
                                                                                              suite.name)
        return [SlurmJob(run, suite.name, request.results_dir, job, log, self.poll_s)
                for run, job, log in zip(runs, jobs, logs, strict=True)]

    def wait(self, handles: Collection[SlurmJob], timeout: float | None = None) -> list[SlurmJob]:
        """Ask the scheduler (one ``squeue`` per suite) until a job has ended or ``timeout`` has passed."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [handle for (suite, results_dir), group in _by_suite(handles).items()
                    for handle, state in zip(group, run_states(suite, [h.run for h in group], results_dir),
                                             strict=True)
                    if state.state not in ACTIVE_STATES]
            left = None if until is None else until - time.monotonic()
            if done or (left is not None and left <= 0):
                return done
            time.sleep(self.poll_s if left is None else min(self.poll_s, left))

    def placement(self, device: object) -> str:
        return f"as {self.cluster.scheduler} jobs"

    def __enter__(self) -> SlurmExecutor:
        """Before the first run: without submitit nothing could be submitted."""
        _import_submitit()
        return self

    def __exit__(self, *error: object) -> None:
        """Nothing to release: submitted jobs run on without this process."""


def _by_suite(handles: Collection[SlurmJob]) -> dict[tuple[str, Path], list[SlurmJob]]:
    groups: dict[tuple[str, Path], list[SlurmJob]] = {}
    for handle in handles:
        groups.setdefault((handle.suite, handle.results_dir), []).append(handle)
    return groups


def submit_suite(request: SuiteRequest, cluster: ClusterConfig, *, dry_run: bool = False, wait: bool = False,
                 poll_s: float = 30.0, echo: Callable[[str], None] = print) -> SuiteRunSummary:
    """Submit every run that has no complete record and no queued or running job; optionally wait for all."""
    suite, path, runs = expand_tier(request.suite, request.tier)
    runs = select_runs(runs, None if request.run_ids is None else list(request.run_ids), path)
    if request.nproc > 1:
        check_data_parallel(request.suite, request.tier, request.nproc)
    folder = jobs_folder(request.results_dir, suite.name)
    summary = SuiteRunSummary(suite.name, request.tier)
    complete = complete_run_ids(suite, runs, request.results_dir, request.force)
    active = {state.run.run_id for state in run_states(suite.name, runs, request.results_dir)
              if state.state in ACTIVE_STATES}
    todo = [run for run in runs if run.run_id not in complete and run.run_id not in active]
    summary.skipped.extend(run.run_id for run in runs if run.run_id in complete or run.run_id in active)
    gpus = job_gpus(request, cluster)
    echo(f"suite {suite.name} v{suite.version}, tier {request.tier}: {len(runs)} runs, {len(complete)} complete, "
         f"{len(active)} queued or running, {len(todo)} to submit ({cluster.scheduler}, {gpus} GPUs per job)")
    if dry_run:
        commands = {run.run_id: request.run_command(path, run.run_id, _python(cluster)) for run in todo}
        _print_dry_run(cluster, folder, gpus, f"repro-{suite.name}", todo, commands, echo)
        return summary
    for job in SlurmExecutor(cluster, poll_s).submit(request, todo):
        summary.submitted.append(job.run.run_id)
        echo(f"{job.run.label}: job {job.job.job_id}, log {job.log}")
    if wait:
        wait_for_runs(suite.name, runs, request.results_dir, summary, poll_s=poll_s, echo=echo)
    return summary


def _print_dry_run(cluster: ClusterConfig, folder: Path, gpus: int, job_name: str, todo: list, commands: dict,
                   echo: Callable[[str], None]) -> None:
    if not todo:
        echo("nothing to submit")
        return
    batches = [todo] if cluster.array else [[run] for run in todo]
    for batch in batches:
        size = len(batch) if len(batch) > 1 else None
        echo(f"# --- sbatch script ({'array of ' + str(size) + ' runs' if size else 'one run'}) ---")
        echo(sbatch_script(cluster, folder, gpus, job_name, size))
        for index, run in enumerate(batch):
            echo(f"# task {index}: {run.run_id} {run.label}\n#   {shlex.join(commands[run.run_id])}")


def wait_for_runs(suite: str, runs: list, results_dir: Path, summary: SuiteRunSummary, *, poll_s: float,
                  echo: Callable[[str], None]) -> None:
    """Return when no run is queued or running; fill the summary from the records, like the local runner."""
    while True:
        states = run_states(suite, runs, results_dir)
        if not any(state.state in ACTIVE_STATES for state in states):
            break
        time.sleep(poll_s)
    for state in states:
        if state.run.run_id in summary.submitted:
            summary.ran.append(state.run.run_id)
            if state.state in ("failed", "pending"):
                summary.failed.append(state.run.run_id)
                echo(f"{state.run.label}: FAILED (job {state.job_id}; log {state.log})")
            elif state.state == "diverged":
                summary.diverged.append(state.run.run_id)
