"""The Slurm executor against a real one-node Slurm cluster (``nox -s slurm`` starts one with
``.ci/slurm-cluster`` and sets ``SLURM_CONF``): submission, requeue, cancel and ``repro status`` as Slurm itself
reports them. Skipped where no cluster answers; the stand-in tests (``test_execute.py``) cover what one node
cannot show (arrays over many nodes, several GPUs per run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from repro.store.records import iter_records
from tests.conftest import computed_fields

pytestmark = pytest.mark.skipif(not os.environ.get("REPRO_TEST_SLURM_CLUSTER") or shutil.which("sbatch") is None,
                                reason="needs the test cluster of `nox -s slurm` (REPRO_TEST_SLURM_CLUSTER)")

ROOT = Path(__file__).resolve().parents[1]
SUITE = """
name: {name}
version: 1
description: a tiny suite for the real-cluster tests
citation: none
dataset: {{name: fashion_mnist, train_subset: {train_images}, test_subset: 64, generated: true}}
backbones: [test_resnet]
normalizers: [{normalizers}]
model: {{small_input: true}}
seeds: [{seeds}]
train: {{epochs: {epochs}, batch_size: 32, lr: 0.05, eval_batch_size: 64}}
tiers:
  full: {{}}
  smoke: {{}}
"""
#: one thread in every run, on the cluster and here alike: the records' numbers depend on the thread count
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
#: a job that asks for every core of the one node: one runs at a time, the others wait
WHOLE_NODE = str(os.cpu_count())


GN = "{name: gn, options: {group_size: 8}}"


def write_suite(folder: Path, name: str, *, normalizers: str = f"bn, {GN}", seeds: str = "0", epochs: int = 1,
                train_images: int = 192) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(SUITE.format(name=name, normalizers=normalizers, seeds=seeds, epochs=epochs,
                                                 train_images=train_images)))
    return path


def repro(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repro", *args], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          check=check, timeout=300)


def submit(suite: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    return repro("run", str(suite), "--tier", "smoke", "--device", "cpu", "--results", str(results),
                 "--executor", "slurm", *extra)


def job_ids(results: Path, suite: str) -> dict[str, str]:
    """Run id -> Slurm job id, from the job files ``repro run --executor slurm`` writes."""
    return {path.stem: json.loads(path.read_text())["job_id"]
            for path in (results / "jobs" / suite).glob("*.json")}


def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip() or "GONE"


def wait_until(predicate, timeout_s: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_jobs_write_the_records_the_local_executor_writes(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "slurm-equal")
    on_cluster, here = tmp_path / "cluster", tmp_path / "local"
    out = submit(suite, on_cluster, "--wait", "--poll-every", "1s")
    assert "2 to submit (slurm" in out.stdout, out.stdout
    repro("run", str(suite), "--tier", "smoke", "--device", "cpu", "--results", str(here), "--no-progress")
    cluster_records = sorted(iter_records(on_cluster, "slurm-equal"), key=lambda r: r["run_id"])
    local_records = sorted(iter_records(here, "slurm-equal"), key=lambda r: r["run_id"])
    assert len(cluster_records) == 2 and all(r["status"] == "ok" for r in cluster_records)
    assert [r["provenance"]["cpu_threads"] for r in cluster_records] == [1, 1]
    jobs = job_ids(on_cluster, "slurm-equal")
    assert [r["provenance"]["job"]["id"] for r in cluster_records] == [jobs[r["run_id"]] for r in cluster_records]
    assert [computed_fields(r) for r in cluster_records] == [computed_fields(r) for r in local_records]


def test_a_job_requeued_while_it_trains_resumes_and_leaves_one_record(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "slurm-requeue", normalizers="bn", epochs=12, train_images=960)
    results = tmp_path / "results"
    submit(suite, results, "--checkpoint-every", "1s")
    ((run_id, job),) = job_ids(results, "slurm-requeue").items()
    states = results / "checkpoints"
    wait_until(lambda: any(states.glob("*.resume.pt")), what="the job's first saved training state")
    subprocess.run(["scontrol", "requeue", job], check=True)
    # Slurm holds a requeued job back for 120 s (its begin time); an administrator's update releases it at once
    wait_until(lambda: squeue_state(job) == "PENDING", what=f"job {job} to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_until(lambda: squeue_state(job) == "GONE", timeout_s=240, what=f"requeued job {job} to end")
    (record,) = iter_records(results, "slurm-requeue")
    assert record["run_id"] == run_id and record["status"] == "ok"
    assert record["extra"].get("resumed_at_epochs"), "the requeued job trained again from the start"
    assert [point["epoch"] for point in record["curve"]] == list(range(1, 13))
    assert len(list((results / "runs" / "slurm-requeue").iterdir())) == 1


def test_a_cancelled_job_leaves_no_record_and_the_next_run_finishes_the_rest(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "slurm-cancel", epochs=12, train_images=960)
    results = tmp_path / "results"
    submit(suite, results, "--cpus-per-task", WHOLE_NODE)
    jobs = job_ids(results, "slurm-cancel")
    wait_until(lambda: any(squeue_state(j) == "RUNNING" for j in jobs.values()), what="a job to start")
    running = next(j for j in jobs.values() if squeue_state(j) == "RUNNING")
    subprocess.run(["scancel", *jobs.values()], check=True)
    wait_until(lambda: all(squeue_state(j) == "GONE" for j in jobs.values()), what="cancelled jobs to end")
    records_dir = results / "runs" / "slurm-cancel"
    assert not records_dir.exists() or not any(records_dir.iterdir()), "a cancelled job left a (half-)record"
    status = repro("status", str(suite), "--tier", "smoke", "--results", str(results)).stdout
    assert f"job {running}" in status and "0 ok" in status
    repro("run", str(suite), "--tier", "smoke", "--device", "cpu", "--results", str(results), "--no-progress")
    assert sorted(r["status"] for r in iter_records(results, "slurm-cancel")) == ["ok", "ok"]


def test_status_shows_queued_running_and_done_as_slurm_reports_them(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "slurm-status", normalizers="bn", seeds="0, 1, 2", epochs=3, train_images=640)
    results = tmp_path / "results"
    submit(suite, results, "--cpus-per-task", WHOLE_NODE)  # one runs, two wait
    jobs = job_ids(results, "slurm-status")

    def status() -> str:
        return repro("status", str(suite), "--tier", "smoke", "--results", str(results)).stdout

    wait_until(lambda: sorted(squeue_state(j) for j in jobs.values()) == ["PENDING", "PENDING", "RUNNING"],
               what="one job running and two pending")
    seen = status()
    assert "1 running" in seen and "2 queued" in seen, seen
    wait_until(lambda: all(squeue_state(j) == "GONE" for j in jobs.values()), what="the jobs to end")
    assert "3 ok" in status()
