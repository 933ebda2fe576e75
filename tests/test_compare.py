"""repro compare on synthetic results folders: matching by run id, deltas, verdicts, provenance, bad input."""

from pathlib import Path

import pytest

from repro.cli import main
from repro.results.compare import compare
from repro.results.records import RECORD_SCHEMA, record_path, write_json_atomic

PROVENANCE = {"git_commit": "abc", "device": "cpu", "device_name": "AMD EPYC", "cpu_threads": 2,
              "packages": {"torch": "2.15.0", "timm": "1.0.31"}}


def record(run_id: str, seed: int, top1: float, *, status: str = "ok", rows: list | None = None,
           wall_time_s: float = 100.0, **provenance) -> dict:
    return {"schema": RECORD_SCHEMA, "suite": "s", "suite_version": 1, "run_id": run_id, "status": status,
            "tier": "laptop", "setting": {"backbone": "resnet20", "normalizer": "bn", "seed": seed}, "config": {},
            "metrics": {"top1": top1, "loss": 0.3, "step_time_ms": 40.0 + wall_time_s}, "rows": rows or [],
            "wall_time_s": wall_time_s, "provenance": {**PROVENANCE, **provenance}}


def write(folder: Path, *records: dict) -> Path:
    for rec in records:
        write_json_atomic(record_path(folder, rec["suite"], rec["run_id"]), rec)
    return folder


def test_identical_folders_ignore_timing(tmp_path):
    a = write(tmp_path / "a", record("r0", 0, 91.0), record("r1", 1, 92.0))
    b = write(tmp_path / "b", record("r0", 0, 91.0, wall_time_s=900.0), record("r1", 1, 92.0))
    result = compare(a, b)
    assert result.verdict == "identical"
    assert list(result.runs["metrics"]) == [2, 2]  # top1 and loss; step_time_ms and wall time are not judged
    assert result.provenance == []


def test_deltas_per_run_and_per_setting(tmp_path):
    a = write(tmp_path / "a", record("r0", 0, 91.0), record("r1", 1, 92.0), record("r2", 2, 90.0))
    b = write(tmp_path / "b", record("r0", 0, 91.3), record("r1", 1, 92.0))
    result = compare(a, b, tolerance=0.5)
    assert result.verdict == "within tolerance"
    assert (result.only_a, result.only_b) == (1, 0)
    assert result.runs.set_index("run_id")["max_abs_delta"].to_dict() == pytest.approx({"r0": 0.3, "r1": 0.0})
    top1 = result.settings[result.settings["metric"] == "top1"].iloc[0]
    assert top1["a"] == pytest.approx((91.0 + 92.0) / 2) and top1["delta"] == pytest.approx(0.3 / 2)
    assert compare(a, b, tolerance=0.2).verdict == "differs"


def test_rows_status_and_provenance(tmp_path):
    row = {"method": "ptbn", "corruption": "fog", "severity": 3, "batch_size": 64, "error": 20.0, "n": 1000}
    a = write(tmp_path / "a", record("r0", 0, 91.0, rows=[row]), record("r1", 1, 92.0))
    b = write(tmp_path / "b", record("r0", 0, 91.0, rows=[{**row, "error": 21.5}], cpu_threads=1,
                                     packages={"torch": "2.16.0", "timm": "1.0.31"}),
              record("r1", 1, 92.0, status="diverged"))
    result = compare(a, b, tolerance=2.0)
    runs = result.runs.set_index("run_id")
    assert runs.loc["r0", "max_abs_delta"] == pytest.approx(1.5)
    assert runs.loc["r0", "worst"] == "error (method=ptbn corruption=fog severity=3 batch_size=64)"
    assert runs.loc["r0", "verdict"] == "within tolerance" and runs.loc["r1", "verdict"] == "differs"
    assert result.verdict == "differs"
    assert result.provenance == ["cpu_threads: A 2 vs B 1, 2", "packages.torch: A 2.15.0 vs B 2.15.0, 2.16.0"]


def test_cli_exit_status_and_report(tmp_path, capsys):
    a = write(tmp_path / "a", record("r0", 0, 91.0))
    b = write(tmp_path / "b", record("r0", 0, 92.0))
    assert main(["compare", str(a), str(b), "--tolerance", "1.0"]) == 0
    assert "**Verdict: within tolerance** (largest |delta| 1, tolerance 1)" in capsys.readouterr().out
    assert main(["compare", str(a), str(b)]) == 1
    assert "**Verdict: differs**" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["b_missing"], "b_missing: no runs/ folder"),
    (["other"], "have no complete run in common"),
    (["b", "--tolerance", "-1"], "--tolerance -1.0: must be at least 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    write(tmp_path / "a", record("r0", 0, 91.0))
    write(tmp_path / "b", record("r0", 0, 91.0))
    write(tmp_path / "other", record("r9", 0, 91.0))
    argv = ["compare", str(tmp_path / "a"), str(tmp_path / args[0]), *args[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_the_same_run_twice_on_cpu_is_identical(suites_dir, tmp_path, capsys):
    """Same seed, same code, same machine: `repro compare` finds every judged number equal."""
    for folder in ("a", "b"):
        assert main(["run", "tiny", "--results", str(tmp_path / folder), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tolerance", "0"]) == 0
    report = capsys.readouterr().out
    assert "2 runs in common" in report and "**Verdict: identical**" in report


def test_timing_in_rows_and_runs_with_only_timing_metrics_are_not_judged(tmp_path):
    rows_a = [{"method": "sar", "batch_size": 8, "error": 40.0, "ms_per_image": 3.0}]
    rows_b = [{"method": "sar", "batch_size": 8, "error": 40.0, "ms_per_image": 14.0}]
    a, b = record("r0", 0, 91.0, rows=rows_a), record("r0", 0, 91.0, rows=rows_b)
    memory_a = {**record("m0", 0, 0.0), "metrics": {"peak_memory_mb": 100.0, "step_time_ms": 5.0}}
    memory_b = {**record("m0", 0, 0.0), "metrics": {"peak_memory_mb": 120.0, "step_time_ms": 9.0}}
    comparison = compare(write(tmp_path / "a", a, memory_a), write(tmp_path / "b", b, memory_b), tolerance=0.0)
    assert comparison.verdict == "identical"
    memory_only = compare(write(tmp_path / "c", memory_a), write(tmp_path / "d", memory_b), tolerance=0.0)
    assert memory_only.verdict == "identical" and memory_only.settings.empty
