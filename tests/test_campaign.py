"""``repro campaign``: a budget that is kept, complete records only, resumption, and an archive that unpacks."""

import json
import multiprocessing
import os
import signal
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from repro.cli import main
from repro.execute.archive import unpack
from repro.execute.campaign import Campaign, PlannedRun, order_runs, parse_duration, plan_suite, window_seconds
from repro.execute.estimate import Estimate, Estimator
from repro.results.records import is_complete, iter_records
from tests.conftest import TINY_SUITE, computed_fields


@pytest.fixture
def campaign_suite(suites_dir: Path) -> str:
    """tiny with eight seeds: sixteen runs of several seconds each (about 2 minutes on 2 idle cores), more than
    a minute's budget holds."""
    text = TINY_SUITE.format(name="tiny4").replace("seeds: [0]", "seeds: [0, 1, 2, 3, 4, 5, 6, 7]")
    text = text.replace("epochs: 1", "epochs: 16")
    (suites_dir / "tiny4.yaml").write_text(textwrap.dedent(text))
    return "tiny4"


def _records(results: Path) -> dict[str, dict]:
    return {r["run_id"]: r for r in iter_records(results, "tiny4")}


def test_campaign_keeps_its_budget_resumes_and_archives(campaign_suite: str, tmp_path: Path) -> None:
    results, archive = tmp_path / "results", tmp_path / "window.tar.gz"
    budget = 60.0
    start = time.monotonic()
    first = Campaign([campaign_suite], "smoke", budget, results, device="cpu", archive=archive).run()
    assert time.monotonic() - start < budget
    records = _records(results)
    assert first.ran and set(first.ran) == set(records)
    assert all(is_complete(r) for r in records.values())
    assert not list(results.glob("runs/**/*.tmp")) and not list(results.glob("checkpoints/*.resume.pt"))

    second = Campaign([campaign_suite], "smoke", 600.0, results, device="cpu").run()
    print(f"first call ran {len(first.ran)} runs, the second {len(second.ran)}")
    assert not set(second.ran) & set(first.ran)
    assert second.ran, "the first call should not have had time for every run"
    assert len(first.ran) + len(second.ran) == 16 and len(_records(results)) == 16

    fresh = tmp_path / "fresh"
    summary = unpack(archive, fresh)
    assert not summary.refused
    assert {k: json.dumps(v, sort_keys=True) for k, v in _records(fresh).items()} == {
        k: json.dumps(records[k], sort_keys=True) for k in first.ran}


def test_order_serves_one_seed_of_every_referenced_setting_first(campaign_suite: str, tmp_path: Path) -> None:
    plan = plan_suite(campaign_suite, "smoke", tmp_path, Estimator(tmp_path, "cpu"), set())
    ordered = order_runs([plan])
    assert [item.run.setting["seed"] for item in ordered[:2]] == [0, 0]
    assert [item.phase for item in ordered] == [0, 0] + [1] * 14
    assert {item.run.setting["normalizer"] for item in ordered[:2]} == {"bn", "gn"}
    assert all(item.references == 1 for item in ordered)


def test_unpack_refuses_a_record_whose_id_disagrees_with_its_content(campaign_suite: str, tmp_path: Path) -> None:
    record_dir = tmp_path / "results" / "runs" / "tiny4"
    record_dir.mkdir(parents=True)
    forged = {"run_id": "0123456789abcdef", "suite": "tiny4", "status": "ok", "schema": 1,
              "config": {"seed": 0}, "metrics": {"top1": 99.0}}
    (record_dir / "0123456789abcdef.json").write_text(json.dumps(forged))
    with tarfile.open(tmp_path / "forged.tar.gz", "w:gz") as tar:
        tar.add(record_dir / "0123456789abcdef.json", arcname="runs/tiny4/0123456789abcdef.json")
        tar.add(record_dir / "0123456789abcdef.json", arcname="../escape.json")
    summary = unpack(tmp_path / "forged.tar.gz", tmp_path / "fresh")
    assert len(summary.refused) == 2 and not summary.added
    assert not (tmp_path / "fresh" / "runs").exists() and not (tmp_path / "escape.json").exists()


def test_plan_json_lists_pending_runs_and_minutes(campaign_suite: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["campaign", campaign_suite, "--tier", "smoke", "--plan", "--json", "--plan-device", "h200",
                 "--results", str(tmp_path)]) == 0
    plan, totals = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert plan["suite"] == "tiny4" and plan["tier"] == "smoke" and plan["device"] == "h200"
    assert plan["pending_runs"] == 16 and plan["estimated_minutes"] > 0
    assert plan["estimate_basis"] == ["cost model (h200, uncalibrated)"]
    assert totals["total_minutes"] == plan["estimated_minutes"] and totals["workers"] == 1
    assert totals["window_minutes"] == pytest.approx(plan["estimated_minutes"], abs=0.02)  # one run at a time


def test_window_on_workers_waits_for_a_model_being_trained() -> None:
    """Estimates 4 (trains model k), 1 (loads k), 2 on two workers: the second waits for the first to end at 4,
    the third fills the other worker meanwhile, so the window ends at 4 + 1."""
    def planned(seconds: float, key: str | None) -> PlannedRun:
        return PlannedRun(suite=None, path=Path("x"), run=None, references=1, phase=0, model_key=key,
                          estimate=Estimate(seconds, "given"))

    assert window_seconds([planned(4, "k"), planned(1, "k"), planned(2, None)], workers=2) == 5
    assert window_seconds([planned(3, None), planned(3, None), planned(2, None), planned(2, None)], workers=2) == 5
    assert window_seconds([planned(3, None), planned(2, None)], workers=1) == 5


@pytest.mark.parametrize(("text", "seconds"), [("9m", 540), ("90s", 90), ("1h30m", 5400), ("45", 45)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_budget_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["campaign", "--budget", "soon", "--plan"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_calibration_sums_the_runs_that_did_their_own_work(campaign_suite: str, tmp_path: Path) -> None:
    """Calibrated scale = Σ measured / Σ modelled over records that did their own work; shared runs, trainings
    loaded from the checkpoint cache and runs on generated stand-in data do not count."""
    from repro.execute.estimate import modelled_seconds, training_workload

    plan = plan_suite(campaign_suite, "smoke", tmp_path, Estimator(tmp_path, "cpu"), set())
    runs = [item.run for item in plan.runs]
    record_dir = tmp_path / "runs" / "tiny4"
    record_dir.mkdir(parents=True)
    provenance = {"device": "cpu", "device_name": "cpu"}

    def write(run, wall: float, **fields) -> None:
        record = {"schema": 1, "suite": "tiny4", "suite_version": 1, "run_id": run.run_id, "status": "ok",
                  "tier": "smoke", "setting": run.setting, "config": run.config, "metrics": {"top1": 50.0},
                  "wall_time_s": wall, "provenance": provenance, **fields}
        (record_dir / f"{run.run_id}.json").write_text(json.dumps(record))

    modelled = [modelled_seconds(run.config, training_workload(run.config), "cpu") for run in runs[:3]]
    write(runs[0], 2.0 * modelled[0])
    write(runs[1], 5.0 * modelled[1])
    write(runs[2], 1000.0, shared_from=runs[0].run_id)
    write(runs[3], 1000.0, extra={"from_checkpoint": "0123456789abcdef"})
    generated = json.loads(json.dumps(runs[4].config))
    generated["dataset"]["train_subset"] = None  # generated stand-in data of a size the cost model cannot know
    write(runs[4], 1000.0)
    record = json.loads((record_dir / f"{runs[4].run_id}.json").read_text())
    (record_dir / f"{runs[4].run_id}.json").write_text(json.dumps({**record, "config": generated}))
    estimator = Estimator(tmp_path, "cpu")
    unseen = json.loads(json.dumps(runs[5].config))
    unseen["train"]["epochs"] = 3  # a configuration no record measured
    estimate = estimator.estimate(unseen, training_workload(unseen))
    expected_scale = (2.0 * modelled[0] + 5.0 * modelled[1]) / (modelled[0] + modelled[1])
    assert estimate.basis == f"cost model x {expected_scale:.2f} (calibrated on cpu records)"
    assert estimate.seconds == pytest.approx(expected_scale * modelled_seconds(unseen, training_workload(unseen),
                                                                               "cpu"))


@pytest.mark.slow
def test_workers_record_what_one_process_records_and_wait_for_a_model_being_trained(suites_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """Two suites train the same two models; on two workers the second suite's runs wait for the first's and load
    the saved models instead of training them again beside it."""
    for name in ("saver", "reader"):
        saving = "citation: none\ntask_options: {save_checkpoint: true}"
        text = TINY_SUITE.format(name=name).replace("citation: none", saving)
        (suites_dir / f"{name}.yaml").write_text(textwrap.dedent(text))
    records = {}
    for workers in (1, 2):
        results = tmp_path / f"workers-{workers}"
        summary = Campaign(["saver", "reader"], "smoke", 600.0, results, device="cpu", workers=workers,
                           echo=lambda _: None).run()
        assert len(summary.ran) == 4 and summary.statuses == {"ok": 4}
        records[workers] = [r for suite in ("saver", "reader") for r in iter_records(results, suite)]
    assert [computed_fields(r) for r in records[2]] == [computed_fields(r) for r in records[1]]
    for normalizer in ("bn", "gn"):
        pair = [r for r in records[2] if r["setting"]["normalizer"] == normalizer]
        loaded = [bool(r["extra"].get("from_checkpoint")) for r in pair]
        assert sorted(loaded) == [False, True], "trained beside the run that was training the same model"


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_only_its_runs(campaign_suite: str, tmp_path: Path) -> None:
    """SIGKILL one of two workers once a run has completed: the campaign ends without raising, names the runs it
    lost, and still leaves every completed record, the check and the archive."""
    results, archive = tmp_path / "results", tmp_path / "window.tar.gz"
    campaign = Campaign([campaign_suite], "smoke", 600.0, results, device="cpu", archive=archive, workers=2,
                        echo=lambda _: None)
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=campaign.run()))
    thread.start()
    deadline = time.monotonic() + 300
    while not list(results.glob("runs/tiny4/*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = multiprocessing.active_children()
    assert workers, "no worker processes found"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(300)
    summary = outcome["summary"]
    assert summary.lost and summary.ran and len(summary.ran) + len(summary.lost) + len(summary.not_started) == 16
    records = _records(results)
    assert set(records) == set(summary.ran) and all(is_complete(r) for r in records.values())
    assert campaign.checks and archive.is_file()
    assert "lost, a worker process died" in (results / "campaign.log").read_text()
