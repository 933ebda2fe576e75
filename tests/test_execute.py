"""Executors: --workers and the Slurm executor (submitit's local executor stands in for Slurm) write the records
the sequential loop writes; resubmission starts nothing new; a preempted job is requeued; dry-run sbatch scripts;
run states from job files, records and a fake squeue."""

import os
import re
import shlex
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from repro.cli import main
from repro.errors import UserError
from repro.execute import run_suite
from repro.execute.base import SuiteRequest
from repro.execute.jobs import new_entry, run_states
from repro.execute.local import run_workers
from repro.execute.runner import expand_tier
from repro.store.atomic import write_json_atomic
from repro.store.records import RECORD_SCHEMA, iter_records
from tests.conftest import computed_fields


def _by_id(results: Path) -> dict[str, dict]:
    return {record["run_id"]: computed_fields(record) for record in iter_records(results, "tiny")}


@pytest.fixture
def sequential(suites_dir: Path, tmp_path: Path) -> dict[str, dict]:
    """The tiny suite's records from the sequential loop in this process."""
    run_suite("tiny", "smoke", device="cpu", results_dir=tmp_path / "sequential", progress=False, echo=lambda _: None)
    records = _by_id(tmp_path / "sequential")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records.values())
    return records


@pytest.mark.slow
def test_workers_write_the_records_of_the_sequential_loop(sequential: dict, tmp_path: Path) -> None:
    request = SuiteRequest("tiny", "smoke", "cpu", tmp_path / "workers", progress=False)
    summary = run_workers(request, 2, echo=lambda _: None)
    assert sorted(summary.ran) == sorted(sequential) and not summary.failed
    assert _by_id(tmp_path / "workers") == sequential
    again = run_workers(request, 2, echo=lambda _: None)
    assert again.ran == [] and sorted(again.skipped) == sorted(sequential), "complete runs are skipped"


def _cluster_file(tmp_path: Path, **fields: object) -> Path:
    lines = ["cluster:", "  scheduler: local", *(f"  {k}: {v}" for k, v in fields.items())]
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _submit(tmp_path: Path, results: Path, *extra: str) -> int:
    return main(["run", "tiny", "--device", "cpu", "--results", str(results), "--executor", "slurm",
                 "--cluster", str(_cluster_file(tmp_path)), *extra])


@pytest.mark.slow
def test_slurm_stand_in_writes_the_sequential_records_and_a_second_submission_starts_nothing(
        sequential: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("submitit")
    results = tmp_path / "slurm"
    assert _submit(tmp_path, results) == 0
    assert "2 submitted" in capsys.readouterr().out
    _, _, runs = expand_tier("tiny", "smoke")
    states = {s.state for s in run_states("tiny", runs, results)}
    assert states <= {"running", "ok"} and "running" in states, "jobs take seconds: the second submission sees them"
    assert _submit(tmp_path, results, "--wait") == 0
    out = capsys.readouterr().out
    assert "0 submitted" not in out and "2 runs, " in out and "0 to submit" in out, "nothing new is submitted"
    assert len(list((results / "jobs" / "tiny").glob("*.json"))) == 2
    assert _by_id(results) == sequential
    assert {s.state for s in run_states("tiny", runs, results)} == {"ok"}
    for record in iter_records(results, "tiny"):
        log = Path(record["provenance"]["job"]["log"])
        assert log.name == f"{record['run_id']}.log" and "1 ran" in log.read_text(), "the record names its log"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's process through /proc")
def test_a_preempted_job_is_requeued_and_completes(sequential: dict, tmp_path: Path) -> None:
    """Slurm's preemption signal (USR2) reaches the job while the run trains: the job is requeued, the run starts
    again and its record is the sequential one."""
    pytest.importorskip("submitit")
    from repro.execute.slurm import cluster_config, submit_suite, wait_for_runs

    results = tmp_path / "slurm"
    run_id = sorted(sequential)[0]
    request = SuiteRequest("tiny", "smoke", "cpu", results, progress=False, run_ids=(run_id,))
    summary = submit_suite(request, cluster_config(_cluster_file(tmp_path), {}), echo=lambda _: None)
    runs = [run for run in expand_tier("tiny", "smoke")[2] if run.run_id == run_id]
    (state,) = run_states("tiny", runs, results)
    log = Path(state.log)
    deadline = time.time() + 120
    while time.time() < deadline and "suite tiny" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    assert "suite tiny" in log.read_text(), "the run started"
    (task,) = _children(int(state.job_id))  # submitit's local job: a controller process, the task its child
    os.kill(task, signal.SIGUSR2)
    wait_for_runs("tiny", runs, results, summary, poll_s=0.2, echo=lambda _: None)
    text = log.read_text()
    assert text.count("== job ") == 2, f"the job ran twice, with the same job id:\n{text}"
    first_attempt = text.split("== job ")[1]
    assert "[1/1]" not in first_attempt, "the first attempt was stopped before the run ended"
    assert _by_id(results) == {run_id: sequential[run_id]}
    assert summary.failed == []


def test_dry_run_prints_the_sbatch_array_for_an_imagenet_suite(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """gn-microbatch-imagenet's full tier on 8 GPUs per run: one array of its 10 runs, at most 4 at once."""
    pytest.importorskip("submitit")
    results = tmp_path / "results"
    cluster = _cluster_file(tmp_path, scheduler="slurm", array_parallelism=4, setup='["module load cuda"]')
    code = main(["run", "gn-microbatch-imagenet", "--tier", "full", "--executor", "slurm", "--dry-run",
                 "--nproc", "8", "--cluster", str(cluster), "--partition", "gpu", "--time", "2880",
                 "--cpus-per-task", "64", "--mem", "480", "--sbatch-option", "account=lab", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0
    _, _, runs = expand_tier("gn-microbatch-imagenet", "full")
    assert len(runs) == 10
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", out, flags=re.M))
    assert flags["array"] == "0-9%4"
    assert (flags["gpus-per-node"], flags["nodes"], flags["ntasks-per-node"]) == ("8", "1", "1"), \
        "one node, one task, 8 GPUs: torchrun inside the job starts the 8 processes"
    assert (flags["partition"], flags["time"], flags["cpus-per-task"], flags["mem"], flags["account"]) == \
        ("gpu", "2880", "64", "480GB", "lab")
    assert flags["signal"].startswith("USR2@"), "preemption warning, for checkpoint and requeue"
    assert out.index("module load cuda") < out.index("submitit.core._submit")
    commands = re.findall(r"^#   (.*)$", out, flags=re.M)
    assert len(commands) == 10
    for run, command in zip(runs, commands, strict=True):
        argv = shlex.split(command)
        assert argv[1:4] == ["-m", "repro", "run"] and argv[argv.index("--run-id") + 1] == run.run_id
        assert argv[argv.index("--nproc") + 1] == "8" and argv[argv.index("--tier") + 1] == "full"
        assert Path(argv[4]).is_absolute() and argv[4].endswith("gn-microbatch-imagenet.yaml")
    assert not (results / "jobs").exists(), "a dry run submits and writes nothing"


def test_run_states_from_records_job_files_and_squeue(suites_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A fake squeue lists job 7_0 as pending and 7_1 as running; job 8 has ended without a record."""
    suites_dir.joinpath("six.yaml").write_text(
        suites_dir.joinpath("tiny.yaml").read_text().replace("name: tiny", "name: six")
        .replace("seeds: [0]", "seeds: [0, 1, 2]"))
    _, _, runs = expand_tier("six", "smoke")
    assert len(runs) == 6
    results = tmp_path / "results"
    jobs = {0: "7_0", 1: "7_1", 2: "8", 3: "9"}
    for index, job_id in jobs.items():
        new_entry(runs[index].run_id, job_id, "slurm", tmp_path / f"{index}.log", ["repro"]).write(results, "six")
    for run, status in ((runs[3], "diverged"), (runs[4], "ok")):
        record = {"schema": RECORD_SCHEMA, "suite": "six", "suite_version": 1, "run_id": run.run_id, "status": status,
                  "tier": "smoke",
                  "setting": run.setting, "config": run.config, "metrics": {}}
        write_json_atomic(results / "runs" / "six" / f"{run.run_id}.json", record)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho '7_0 PENDING'\necho '7_1 RUNNING'\necho '12 RUNNING'\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    states = run_states("six", runs, results)
    assert [s.state for s in states] == ["queued", "running", "failed", "diverged", "ok", "pending"]
    assert states[2].log == str(tmp_path / "2.log") and states[2].job_id == "8"
    assert main(["status", "six", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 pending, 1 queued, 1 running, 1 ok, 1 failed, 1 diverged" in out
    assert f"failed    {runs[2].run_id}" in out and str(tmp_path / "2.log") in out


@pytest.mark.parametrize(("text", "message"), [
    ("cluster:\n  partitoin: gpu\n", "field cluster.partitoin: unknown key; allowed: scheduler, partition"),
    ("cluster:\n  time: 0\n", "field cluster.time: Input should be greater than or equal to 1"),
    ("slurm:\n  time: 10\n", "field cluster: required but missing"),
])
def test_a_bad_cluster_file_names_its_field(suites_dir: Path, tmp_path: Path, text: str, message: str,
                                            capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    code = main(["run", "tiny", "--executor", "slurm", "--dry-run", "--cluster", str(path),
                 "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: {message}" in err, err
    assert not (tmp_path / "results").exists()


def test_without_submitit_the_error_names_the_extra(suites_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from repro.execute.campaign import Campaign
    from repro.execute.slurm import ClusterConfig, SlurmExecutor, submit_suite

    monkeypatch.setitem(sys.modules, "submitit", None)
    request = SuiteRequest("tiny", "smoke", "cpu", tmp_path / "results")
    missing = r"--executor slurm needs submitit: pip install 'repro\[slurm\]'"
    for dry_run in (True, False):
        with pytest.raises(UserError, match=missing):
            submit_suite(request, ClusterConfig(), dry_run=dry_run, echo=lambda _: None)
    campaign = Campaign(["tiny"], "smoke", 600.0, tmp_path / "results", executor=SlurmExecutor(ClusterConfig()),
                        kind="cpu", echo=lambda _: None)
    with pytest.raises(UserError, match=missing):
        campaign.run()
    assert not (tmp_path / "results" / "runs").exists() and not (tmp_path / "results" / "jobs").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "2", "--executor", "slurm"], "--workers 2: applies to --executor local"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--wait"], "--wait: applies to --executor slurm"),
    (["--workers", "2", "--nproc", "2"], "--workers 2: a run with --nproc 2 already uses several processes"),
])
def test_executor_flags_that_do_not_go_together(suites_dir: Path, tmp_path: Path, flags: list[str], message: str,
                                                capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("repro.execute.runner.check_data_parallel", lambda *args: None)
    code = main(["run", "tiny", "--device", "cpu", "--results", str(tmp_path), *flags])
    assert code == 2 and message in capsys.readouterr().err


def _fake_commands(bin_dir: Path, **scripts: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_submission_through_a_fake_sbatch_and_no_duplicate_on_resubmission(
        suites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """submitit's real Slurm path against fake sbatch/srun/squeue: one array of the 2 runs, job ids 4242_0 and
    4242_1 in the job files; while squeue lists them, submitting again starts nothing."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    _fake_commands(bin_dir, srun="exit 0", squeue="exit 0",
                   sbatch=f'cp "$1" {tmp_path}/submitted-$$.sh; echo "Submitted batch job 4242"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    results = tmp_path / "results"
    argv = ["run", "tiny", "--tier", "smoke", "--results", str(results), "--executor", "slurm", "--partition", "p1",
            "--gpus-per-node", "2"]
    assert main(argv) == 0
    (script,) = tmp_path.glob("submitted-*.sh")
    text = script.read_text()
    assert "#SBATCH --array=0-1%" in text and "#SBATCH --partition=p1" in text and "#SBATCH --gpus-per-node=2" in text
    _, _, runs = expand_tier("tiny", "smoke")
    assert sorted(s.job_id for s in run_states("tiny", runs, results)) == ["4242_0", "4242_1"]
    assert "2 submitted" in capsys.readouterr().out
    _fake_commands(bin_dir, squeue="echo '4242_0 RUNNING'; echo '4242_1 PENDING'")
    assert [s.state for s in run_states("tiny", runs, results)] == ["running", "queued"]
    script.unlink()
    assert main(argv) == 0
    assert "0 submitted" in capsys.readouterr().out and not list(tmp_path.glob("submitted-*.sh"))
    _fake_commands(bin_dir, squeue="echo '4242_1 PENDING'")
    assert main(argv) == 0, "job 4242_0 ended without a record: it is submitted again, 4242_1 is not"
    assert "1 submitted" in capsys.readouterr().out
