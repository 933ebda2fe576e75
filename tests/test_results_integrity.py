"""Promises about results: a passing check means every run it needs has a current, complete record; stale,
failed or damaged records are reported and never used; a damaged folder heals on the next run. One test per
defect found by trying repro as a new user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.cli import main
from repro.execute import run_suite
from repro.store.atomic import atomic_path, write_json_atomic
from repro.store.records import RECORD_SCHEMA, read_record, record_path
from repro.suite import expand, load_suite
from repro.suite.expand import run_id_of
from repro.tasks.base import RunContext, RunOutcome, model_key, train_or_load
from repro.tasks.train import TrainTask


def _write_records(results: Path, tier: str, top1: dict[str, float], failed: set[tuple[str, int]] = frozenset()
                   ) -> list[Path]:
    """Records of every current run of the tiny suite at ``tier``, as ``repro run`` writes them, with the
    test's own numbers (``top1`` by normalizer); ``failed`` (normalizer, seed) pairs get failed records."""
    suite, _ = load_suite("tiny")
    paths = []
    for run in expand(suite, tier):
        is_failed = (run.setting["normalizer"], run.setting["seed"]) in failed
        record = {"schema": RECORD_SCHEMA, "suite": "tiny", "suite_version": suite.version, "run_id": run.run_id,
                  "status": "failed" if is_failed else "ok", "tier": tier, "setting": run.setting,
                  "config": run.config, "metrics": {} if is_failed else {"top1": top1[run.setting["normalizer"]]},
                  "curve": [], "rows": [], "wall_time_s": 1.0, "peak_memory_mb": None, "images_per_s": None}
        paths.append(record_path(results, "tiny", run.run_id))
        write_json_atomic(paths[-1], record)
    return paths


def _quick_runs(monkeypatch: pytest.MonkeyPatch, calls: list[str] | None = None, interrupt_at: int = 0) -> None:
    """TrainTask.run returns at once (these tests are about bookkeeping, not training)."""
    calls = [] if calls is None else calls

    def quick(self, run, ctx):
        calls.append(run.setting["normalizer"])
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return RunOutcome("ok", {"top1": 50.0}, 0.01)

    monkeypatch.setattr(TrainTask, "run", quick)


def _set_seeds(suites_dir: Path, seeds: str) -> None:
    path = suites_dir / "tiny.yaml"
    path.write_text(path.read_text().replace("seeds: [0]", f"seeds: {seeds}", 1))


# --- 1. gather never guesses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("breakage", ["yaml typo", "no suite file"])
def test_gather_with_an_unloadable_suite_fails_and_keeps_the_tables(breakage: str, suites_dir: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    _write_records(results, "smoke", {"bn": 90.0, "gn": 80.0})
    assert main(["gather", "--results", str(results)]) == 0
    tables = {p: p.read_bytes() for p in (results / "tables").iterdir()}
    capsys.readouterr()
    path = suites_dir / "tiny.yaml"
    if breakage == "yaml typo":
        path.write_text(path.read_text().replace("seeds: [0]", "seeds: [0", 1))
    else:
        path.unlink()
    assert main(["gather", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny" in err
    assert {p: p.read_bytes() for p in (results / "tables").iterdir()} == tables


def test_gather_of_a_mistyped_results_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["gather", "--results", str(tmp_path / "typo")]) == 2
    assert "typo: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_interrupted_gather_leaves_the_old_table_whole(suites_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 half-way through writing a table: simulated by stopping at the first flush to disk."""
    from repro.results.gather import gather

    results = tmp_path / "results"
    _write_records(results, "smoke", {"bn": 90.0, "gn": 80.0})
    gather(results)
    table = results / "tables" / "tiny.md"
    before = table.read_bytes()
    _write_records(results, "smoke", {"bn": 10.0, "gn": 20.0})

    def killed(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        gather(results)
    assert table.read_bytes() == before
    assert not [p for p in (results / "tables").iterdir() if p.name.endswith(".tmp")]


# --- 2. identity: stale records and checkpoints -----------------------------------------------------------------

def test_records_of_an_older_version_are_reported_stale_by_gather_and_check(suites_dir: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    _write_records(results, "smoke", {"bn": 90.0, "gn": 80.0})
    path = suites_dir / "tiny.yaml"
    assert main(["gather", "--results", str(results)]) == 0
    table = (results / "tables" / "tiny.md").read_text()
    path.write_text(path.read_text().replace("version: 1", "version: 2", 1))
    assert main(["gather", "--results", str(results)]) == 0
    assert "tiny: 0 runs (2 stale records" in capsys.readouterr().out
    assert " 90 |" in table and " 90 |" not in (results / "tables" / "tiny.md").read_text(), "no stale numbers"
    assert not (results / "tables" / "tiny.csv").exists()
    assert main(["check", "--results", str(results), "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 2 stale records" in out and "| not run" in out


def test_force_retrains_a_cached_model(suites_dir: Path, tmp_path: Path) -> None:
    """Quantize and TTA tasks take their models from train_or_load: --force must not reuse the checkpoint."""
    suite, _ = load_suite("tiny")
    run = expand(suite, "smoke")[0]
    ctx = RunContext(torch.device("cpu"), tmp_path, progress=False)
    first = train_or_load(run, ctx)
    assert not first.from_checkpoint and ctx.checkpoint_path(run).is_file()
    assert train_or_load(run, ctx).from_checkpoint
    forced = RunContext(torch.device("cpu"), tmp_path, progress=False, retrain=True)
    assert not train_or_load(run, forced).from_checkpoint


def test_a_cached_model_carries_what_its_training_record_would_say(suites_dir: Path, tmp_path: Path) -> None:
    """A training resumed from a saved state says so (``resumed_at_epochs``); quantize and TTA records that load
    the model from the checkpoint cache still carry it."""
    suite, _ = load_suite("tiny")
    run = expand(suite, "smoke")[0]
    ctx = RunContext(torch.device("cpu"), tmp_path, progress=False)
    assert train_or_load(run, ctx).training_extra == {}  # trained in one go
    path = ctx.checkpoint_path(run)
    payload = torch.load(path, weights_only=False)
    payload["result"]["extra"] = {"resumed_at_epochs": [1]}
    torch.save(payload, path)
    loaded = train_or_load(run, ctx)
    assert loaded.from_checkpoint and loaded.training_extra == {"resumed_at_epochs": [1]}


def test_checkpoint_key_covers_synchronized_batchnorm(suites_dir: Path) -> None:
    suite, _ = load_suite("tiny")
    config = expand(suite, "smoke")[0].config
    synced = {**config, "task_options": {**config["task_options"], "sync_batchnorm": True}}
    assert model_key(synced) != model_key(config)


ROOT = Path(__file__).resolve().parents[1]
#: committed records and the folder of the suite files they were run from
COMMITTED = ((ROOT / "results" / "runs", ROOT / "suites"),
             (ROOT / "results" / "experiments" / "runs", ROOT / "benchmarks" / "experiments"))


def test_committed_records_are_runs_their_suites_still_expand_to() -> None:
    """Every committed record of its suite's current version is a run that expanding the suite gives today, with
    the same config, and its id is that config's hash (what ``repro unpack`` re-derives). A change to expansion or
    a new ``TrainConfig`` field that moved ids would orphan hundreds of records and checkpoints; this catches it."""
    current = 0
    for records, suites in COMMITTED:
        expanded: dict[tuple[str, str], dict[str, dict]] = {}
        for path in sorted(records.glob("*/*.json")):
            record = read_record(path)
            assert record is not None and record["run_id"] == path.stem == run_id_of(record["config"]), path
            suite, _ = load_suite(suites / f"{record['suite']}.yaml")
            if record["suite_version"] != suite.version:
                continue  # stale by design: a version bump gives every run a new id
            key = (suite.name, record["tier"])
            if key not in expanded:
                expanded[key] = {run.run_id: run.config for run in expand(suite, record["tier"])}
            assert expanded[key].get(record["run_id"]) == record["config"], path
            current += 1
    assert current > 100


# --- 3. a check that checks -------------------------------------------------------------------------------------

def test_failed_runs_make_a_reference_incomplete_and_n_counts_used_runs(suites_dir: Path, tmp_path: Path) -> None:
    from repro.results.gather import run_checks

    _set_seeds(suites_dir, "[0, 1, 2]")
    results = tmp_path / "results"
    _write_records(results, "smoke", {"bn": 90.0, "gn": 80.0}, failed={("bn", 1), ("bn", 2)})
    (result,) = run_checks(results, ["tiny"])
    assert result.status == "incomplete" and result.n == 1  # seeds usable on the smaller side (bn)
    assert "2 failed of 3 runs" in result.detail


def test_a_metric_no_record_has_fails_instead_of_staying_not_run(suites_dir: Path, tmp_path: Path) -> None:
    from repro.results.gather import run_checks

    path = suites_dir / "tiny.yaml"
    path.write_text(path.read_text().replace("metric: top1", "metric: top_1", 1))
    results = tmp_path / "results"
    _write_records(results, "smoke", {"bn": 90.0, "gn": 80.0})
    (result,) = run_checks(results, ["tiny"])
    assert result.status == "fail" and "no metric 'top_1'" in result.detail


@pytest.mark.parametrize("strict", [False, True])
def test_strict_check_fails_when_a_reference_is_not_run(strict: bool, suites_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_records(results, "full", {"bn": 90.0, "gn": 80.0})  # the reference is of the smoke tier
    flags = ["--strict"] if strict else []
    assert main(["check", "--results", str(results), "tiny", *flags]) == (1 if strict else 0)


def test_strict_check_passes_on_complete_records_with_an_interval(suites_dir: Path, tmp_path: Path) -> None:
    one_seed, three_seeds = tmp_path / "one", tmp_path / "three"
    _write_records(one_seed, "smoke", {"bn": 90.0, "gn": 80.0})
    # one seed per side gives no interval: inconclusive, which a plain check lists and a strict check fails on
    assert main(["check", "--results", str(one_seed), "tiny"]) == 0
    assert main(["check", "--results", str(one_seed), "tiny", "--strict"]) == 1
    _set_seeds(suites_dir, "[0, 1, 2]")
    _write_records(three_seeds, "smoke", {"bn": 90.0, "gn": 80.0})
    assert main(["check", "--results", str(three_seeds), "tiny", "--strict"]) == 0


# --- 4. a folder that heals -------------------------------------------------------------------------------------

def test_truncated_checkpoint_is_moved_aside_and_retrained(suites_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    suite, _ = load_suite("tiny")
    run = expand(suite, "smoke")[0]
    ctx = RunContext(torch.device("cpu"), tmp_path, progress=False)
    path = ctx.checkpoint_path(run)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    saved_to = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (saved_to.append(Path(f)), real_save(obj, f)))
    trained = train_or_load(run, ctx)
    assert not trained.from_checkpoint and trained.status == "ok"
    err = capsys.readouterr().err
    assert str(path) in err and "moved to" in err
    assert [p.name for p in path.parent.glob(f"{path.name}.bad-*")], "the damaged file is kept for inspection"
    assert torch.load(path, weights_only=True)["metrics"] == trained.metrics
    (partial,) = saved_to
    assert str(os.getpid()) in partial.name, "temp names are per process: concurrent runs never share one"


def test_malformed_record_is_reported_and_treated_as_missing(suites_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    bad, _ = _write_records(results, "smoke", {"bn": 90.0, "gn": 80.0})
    text = bad.read_text().replace('"metrics"', '"metricz"')
    bad.write_text(text)
    assert main(["gather", "--results", str(results)]) == 0
    assert f"{bad}: malformed record (field metrics is missing)" in capsys.readouterr().err
    assert main(["check", "--results", str(results), "tiny"]) == 0
    assert "| incomplete" in capsys.readouterr().out
    calls: list[str] = []
    _quick_runs(monkeypatch, calls)
    run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert calls == ["bn"], "only the malformed record's run runs again"
    assert read_record(bad) is not None


def test_unwritable_results_folder_fails_before_training(suites_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _quick_runs(monkeypatch, calls)
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where the folder should be")
    assert main(["run", "tiny", "--results", str(not_a_folder)]) == 2
    assert "--results" in capsys.readouterr().err
    assert calls == []


def test_a_run_locked_by_a_live_process_is_not_run_twice(suites_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from repro.store.records import lock_path

    results = tmp_path / "results"
    suite, _ = load_suite("tiny")
    first, second = expand(suite, "smoke")
    busy = lock_path(record_path(results, "tiny", first.run_id))
    busy.parent.mkdir(parents=True)
    busy.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process that is not this one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = lock_path(record_path(results, "tiny", second.run_id))
    stale.write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")  # its process has exited (kill -9)
    calls: list[str] = []
    _quick_runs(monkeypatch, calls)
    summary = run_suite("tiny", "smoke", results_dir=results, progress=False, echo=lambda _: None)
    assert calls == ["gn"] and summary.skipped == [first.run_id]
    assert busy.exists() and not stale.exists(), "the live lock is left alone, the stale one taken and released"


def test_records_are_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "s" / "r.json"
    write_json_atomic(path, {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_path_gives_each_writer_its_own_temp_file_and_keeps_the_old_file_on_an_error(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "a.png"
    with atomic_path(path) as outer, atomic_path(path) as inner:
        assert outer != inner and str(os.getpid()) in outer.name, "concurrent writers never share a temp file"
        outer.write_bytes(b"new")
        inner.write_bytes(b"old")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o644, "the last to finish wins, whole"
    with pytest.raises(RuntimeError), atomic_path(path) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["a.png"]


# --- 7. Ctrl-C ---------------------------------------------------------------------------------------------------

def test_ctrl_c_prints_one_line_and_exits_130(suites_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _quick_runs(monkeypatch, interrupt_at=2)
    assert main(["run", "tiny", "--results", str(tmp_path / "results"), "--no-progress"]) == 130
    assert capsys.readouterr().err == "interrupted: 1 runs complete; the same command resumes\n"
