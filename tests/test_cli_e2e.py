"""One end-to-end smoke run through the command line: run, gather, check, and a second run that trains nothing."""

import subprocess
import sys
from pathlib import Path

import pytest


def _repro(*args: str, env_dir: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "REPRO_SUITES_DIR": str(env_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "repro", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_run_gather_check_rerun(suites_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    first = _repro("run", str(suites_dir / "tiny.yaml"), "--tier", "smoke", "--results", str(results),
                   "--no-progress", env_dir=suites_dir)
    assert first.returncode == 0, first.stderr
    assert "2 ran, 0 skipped" in first.stdout
    assert len(list((results / "runs" / "tiny").glob("*.json"))) == 2

    gathered = _repro("gather", "--results", str(results), env_dir=suites_dir)
    assert gathered.returncode == 0, gathered.stderr
    for name in ("tiny.csv", "tiny.md"):
        assert (results / "tables" / name).is_file()
    assert "| smoke  | test_resnet" in (results / "tables" / "tiny.md").read_text()
    assert "[table](tables/tiny.md)" in (results / "README.md").read_text()

    checked = _repro("check", "--results", str(results), "tiny", env_dir=suites_dir)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # one seed per side gives no interval: listed as inconclusive, which fails only a strict check
    assert "gn-vs-bn" in checked.stdout and "0 passed, 0 failed, 1 inconclusive" in checked.stdout
    assert _repro("check", "--results", str(results), "tiny", "--strict", env_dir=suites_dir).returncode == 1

    again = _repro("run", "tiny", "--results", str(results), "--no-progress", env_dir=suites_dir)
    assert again.returncode == 0 and "0 ran, 2 skipped" in again.stdout

    listed = _repro("list", env_dir=suites_dir)
    assert "tiny" in listed.stdout and "smoke: 2 runs" in listed.stdout


@pytest.mark.slow
def test_a_suite_file_outside_suites_runs_gathers_and_checks_by_its_path(suites_dir: Path, tmp_path: Path) -> None:
    """An experiment kept outside suites/ (benchmarks/experiments/) goes through run, gather and check by path."""
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    experiment = experiments / "tiny-experiment.yaml"
    experiment.write_text((suites_dir / "tiny.yaml").read_text().replace("name: tiny", "name: tiny-experiment"))
    results = tmp_path / "results"
    ran = _repro("run", str(experiment), "--tier", "smoke", "--results", str(results), "--no-progress",
                 env_dir=suites_dir)
    assert ran.returncode == 0, ran.stderr
    gathered = _repro("gather", "--results", str(results), str(experiment), env_dir=suites_dir)
    assert gathered.returncode == 0, gathered.stderr
    assert (results / "tables" / "tiny-experiment.md").is_file()
    checked = _repro("check", "--results", str(results), str(experiment), env_dir=suites_dir)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "tiny-experiment" in checked.stdout and "0 passed, 0 failed, 1 inconclusive" in checked.stdout
