"""Resume after an interrupted suite, diverged and failed records, atomic writes, provenance."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.data import load_dataset
from repro.execute import run_suite, runner
from repro.models import build_model
from repro.store.atomic import write_json_atomic
from repro.store.records import iter_records
from repro.suite.load import file_sha256
from repro.tasks.base import RunOutcome
from repro.tasks.train import TrainTask
from repro.train import TrainConfig, train_and_evaluate


def _records(results: Path) -> list[dict]:
    return iter_records(results, "tiny")


def test_interrupted_suite_keeps_completed_runs_and_resumes(suites_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    real_run = TrainTask.run
    calls = []

    def interrupted_second_run(self, run, ctx):
        calls.append(run.setting["normalizer"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, run, ctx)

    monkeypatch.setattr(TrainTask, "run", interrupted_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert [r["setting"]["normalizer"] for r in _records(results)] == ["bn"]
    assert not list((results / "runs" / "tiny").glob(".*tmp")), "no half-written file"

    monkeypatch.setattr(TrainTask, "run", real_run)
    summary = run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert len(summary.skipped) == 1 and len(summary.ran) == 1
    assert sorted(r["setting"]["normalizer"] for r in _records(results)) == ["bn", "gn"]
    again = run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert again.ran == [] and len(again.skipped) == 2, "a complete suite does no training"
    forced = run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None, force=True)
    assert len(forced.ran) == 2


@pytest.mark.slow
def test_killed_process_leaves_no_complete_looking_record(suites_dir: Path, tmp_path: Path) -> None:
    """SIGKILL during the second run: the first record stays, the second is absent, the rerun finishes it."""
    results = tmp_path / "results"
    env = {**os.environ, "REPRO_SUITES_DIR": str(suites_dir), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "repro", "run", "tiny", "--results", str(results), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = results / "runs" / "tiny"
    deadline = time.time() + 240
    while time.time() < deadline and not list(folder.glob("*.json")):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    records = list(folder.glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["status"] == "ok"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "1 ran, 1 skipped" in finished.stdout


def test_failed_run_is_recorded_and_the_suite_goes_on(suites_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = TrainTask.run

    def fail_bn(self, run, ctx):
        if run.setting["normalizer"] == "bn":
            raise RuntimeError("simulated out of memory")
        return real_run(self, run, ctx)

    monkeypatch.setattr(TrainTask, "run", fail_bn)
    results = tmp_path / "results"
    summary = run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert len(summary.failed) == 1 and len(summary.ran) == 2
    by_norm = {r["setting"]["normalizer"]: r for r in _records(results)}
    assert by_norm["bn"]["status"] == "failed" and "simulated out of memory" in by_norm["bn"]["error"]
    assert by_norm["gn"]["status"] == "ok"
    monkeypatch.setattr(TrainTask, "run", real_run)
    retry = run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert len(retry.ran) == 1, "a failed run is not complete and runs again"


def test_nan_loss_gives_a_diverged_record_with_its_step() -> None:
    data = load_dataset("fashion_mnist", generated=True).subset(64, 32)
    torch.manual_seed(0)
    model = build_model("test_resnet", "none", num_classes=10, in_chans=1, small_input=True)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, momentum=0.0, weight_decay=0.0)
    result = train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=0, progress=False)
    assert result.status == "diverged"
    # One step at lr 1e30 makes the weights overflow, so the loss of step 2 (at the latest step 3) is not finite.
    assert result.diverged_step is not None and 1 <= result.diverged_step <= 3
    assert result.metrics["top1"] is None


def test_record_fields_and_provenance(suites_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    record = _records(results)[0]
    for key in ("suite", "suite_version", "run_id", "status", "tier", "config", "metrics", "wall_time_s",
                "peak_memory_mb", "images_per_s", "provenance", "curve"):
        assert key in record
    assert {"top1", "loss"} <= set(record["metrics"]) and len(record["curve"]) == 1
    assert record["config"]["backbone"] == "test_resnet" and record["config"]["seed"] == 0
    prov = record["provenance"]
    for key in ("git_commit", "git_dirty", "packages", "python", "torch", "cuda", "device_name", "data_fingerprint",
                "suite_sha256"):
        assert key in prov
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0]


def test_provenance_is_read_at_the_start_and_a_change_during_the_run_is_recorded(
        suites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit and a suite edit made while the first run trains: its record names the code it started with and
    says what changed; the second run starts after the commit, and nothing changes while it runs."""
    head = {"commit": "commit-at-start"}
    monkeypatch.setattr(runner, "source_version",
                        lambda: {"git_commit": head["commit"], "git_dirty": False, "source": "git"})
    suite_file = suites_dir / "tiny.yaml"
    start_sha = file_sha256(suite_file)

    def commit_during_first_run(self, run, ctx):
        if head["commit"] == "commit-at-start":
            head["commit"] = "commit-made-during-the-run"
            suite_file.write_text(suite_file.read_text() + "# edited\n")
        return RunOutcome("ok", {"top1": 50.0}, 0.01)

    monkeypatch.setattr(TrainTask, "run", commit_during_first_run)
    lines: list[str] = []
    run_suite("tiny", "smoke", results_dir=tmp_path / "results", progress=False, echo=lines.append)
    first, second = (next(r for r in _records(tmp_path / "results") if r["setting"]["normalizer"] == normalizer)
                     for normalizer in ("bn", "gn"))
    assert first["provenance"]["git_commit"] == "commit-at-start"
    assert first["provenance"]["suite_sha256"] == start_sha
    assert first["provenance"]["changed_during_run"] == {
        "git_commit": {"start": "commit-at-start", "end": "commit-made-during-the-run"},
        "suite_sha256": {"start": start_sha, "end": file_sha256(suite_file)}}
    assert first["extra"]["provenance"] == "changed during the run"
    assert [line for line in lines if "provenance: changed during the run" in line] == [lines[1]]
    assert second["provenance"]["git_commit"] == "commit-made-during-the-run"
    assert "changed_during_run" not in second["provenance"] and "provenance" not in second["extra"]


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object.__new__(type("Unserializable", (), {"__str__": None}))})
    assert not target.exists() and list(tmp_path.iterdir()) == []
