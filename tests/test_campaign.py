"""``repro campaign``: a budget that is kept, complete records only, resumption, and an archive that unpacks."""

import dataclasses
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
from repro.execute.base import SuiteRequest
from repro.execute.campaign import Campaign
from repro.execute.estimate import Estimate, Estimator
from repro.execute.local import SequentialExecutor, WorkerExecutor
from repro.execute.plan import PlannedRun, order_runs, parse_duration, plan_suite, window_seconds
from repro.store.records import is_complete, iter_records
from repro.tasks.base import RunOutcome, RunSpec, typed_config
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


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeJob:
    def __init__(self, run: RunSpec) -> None:
        self.run, self.state = run, "queued"

    def done(self) -> bool:
        return self.state != "queued"

    def result(self) -> tuple[RunOutcome, None]:
        assert self.state == "ended", "the campaign asked for the result of a job that has not ended"
        return RunOutcome("ok", {"top1": 12.5}, 1.0), None

    def cancel(self) -> bool:
        self.state = "cancelled"
        return True


class FakeCluster:
    """Runs nothing: each of its first two waits ends the oldest job one (fake) second later; the third lasts until
    the time it is given, when the campaign must stop, and ends nothing."""

    slots = 2
    runs_here = False

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.submitted: list[tuple[SuiteRequest, str, float | None]] = []
        self.in_flight: list[FakeJob] = []
        self.most_in_flight = 0
        self.waits = 0

    def expect(self, runs: int) -> None:
        pass

    def submit(self, request: SuiteRequest, runs: list[RunSpec], seconds_left: float | None = None) -> list[FakeJob]:
        jobs = [FakeJob(run) for run in runs]
        self.submitted += [(request, run.run_id, seconds_left) for run in runs]
        self.in_flight += jobs
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return jobs

    def wait(self, handles: list[FakeJob], timeout: float | None = None) -> list[FakeJob]:
        self.waits += 1
        if self.waits > 2:
            self.clock.now += timeout
            return []
        self.clock.now += 1.0
        oldest = self.in_flight.pop(0)
        oldest.state = "ended"
        return [oldest]

    def placement(self, device: object) -> str:
        return "on a fake cluster"

    def __enter__(self) -> "FakeCluster":
        return self

    def __exit__(self, *error: object) -> None:
        pass


def test_a_campaign_runs_on_the_executor_it_is_given_and_cancels_its_jobs_at_the_deadline(
        campaign_suite: str, tmp_path: Path) -> None:
    """On a fake two-slot cluster: the runs go to it in the campaign's order, two at a time, with the time left
    before the closing reserve and the device as given (not resolved here: cuda on this CPU machine). Two end; the
    two in flight at the deadline are cancelled; the other twelve are not started. Nothing runs here."""
    from repro.execute.campaign import CLOSING_RESERVE_S

    clock = FakeClock()
    cluster = FakeCluster(clock)
    budget = 1000.0
    campaign = Campaign([campaign_suite], "smoke", budget, tmp_path / "results", device="cuda", executor=cluster,
                        kind="cpu", clock=clock, echo=lambda _: None)
    order = [item.run.run_id for item in order_runs(campaign.plans("cpu"))]
    summary = campaign.run()
    submitted = [run_id for _, run_id, _ in cluster.submitted]
    assert submitted == order[:4] and cluster.most_in_flight == 2
    assert [seconds for _, _, seconds in cluster.submitted] == [budget - CLOSING_RESERVE_S] * 2 + [
        budget - CLOSING_RESERVE_S - 1, budget - CLOSING_RESERVE_S - 2]
    assert {request.device for request, _, _ in cluster.submitted} == {"cuda"}
    assert summary.ran == order[:2] and summary.statuses == {"ok": 2}
    assert summary.cancelled == order[2:4] and summary.not_started == order[4:]
    assert not list((tmp_path / "results").glob("runs/**/*.json")), "nothing ran in this process"


def test_order_serves_one_seed_of_every_referenced_setting_first(campaign_suite: str, tmp_path: Path) -> None:
    plan = plan_suite(campaign_suite, "smoke", tmp_path, Estimator(tmp_path, "cpu"), {})
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
    """Estimates 4 (trains and saves model k), 1 (loads k), 2 on two workers: the second waits for the first to
    end at 4, the third fills the other worker meanwhile, so the window ends at 4 + 1. A run that trains k without
    saving it makes no one wait: there is nothing to load when it ends."""
    def planned(seconds: float, key: str | None, saves: bool = False) -> PlannedRun:
        return PlannedRun(suite=None, path=Path("x"), run=None, references=1, phase=0, model_key=key,
                          estimate=Estimate(seconds, "given"), saves_model=saves)

    assert window_seconds([planned(4, "k", saves=True), planned(1, "k"), planned(2, None)], workers=2) == 5
    assert window_seconds([planned(4, "k"), planned(1, "k"), planned(2, None)], workers=2) == 4
    assert window_seconds([planned(3, None), planned(3, None), planned(2, None), planned(2, None)], workers=2) == 5
    assert window_seconds([planned(3, None), planned(2, None)], workers=1) == 5


@pytest.mark.parametrize(("text", "seconds"), [("9m", 540), ("90s", 90), ("1h30m", 5400), ("45", 45)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_duration_above_0_is_one_rule() -> None:
    """--budget and --poll-every need a duration above 0; --checkpoint-every 0 means every epoch and stays allowed."""
    from repro.errors import UserError

    for flag in ("--budget", "--poll-every"):
        with pytest.raises(UserError, match=f"^{flag} '0s': must be more than 0"):
            parse_duration("0s", flag, above_zero=True)
    assert parse_duration("0", "--checkpoint-every") == 0


def test_poll_every_of_nothing_is_refused_by_repro_run(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "fmnist-baseline", "--executor", "slurm", "--dry-run", "--poll-every", "0s"]) == 2
    assert capsys.readouterr().err == "repro: error: --poll-every '0s': must be more than 0, such as 90s or 9m\n"


def test_bad_budget_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["campaign", "--budget", "soon", "--plan"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _with_train(run: RunSpec, **train) -> RunSpec:
    """``run`` with its training recipe changed, in its stored and its typed form alike."""
    config = json.loads(json.dumps(run.config))
    config["train"].update(train)
    return dataclasses.replace(run, config=config, typed_config=typed_config(config))


def test_calibration_sums_the_runs_that_did_their_own_work(campaign_suite: str, tmp_path: Path) -> None:
    """Calibrated scale = Σ measured / Σ modelled over records that did their own work; shared runs, trainings
    loaded from the checkpoint cache and runs on generated stand-in data do not count."""
    from repro.execute.estimate import modelled_seconds
    from repro.tasks.workload import training_workload

    plan = plan_suite(campaign_suite, "smoke", tmp_path, Estimator(tmp_path, "cpu"), {})
    runs = [item.run for item in plan.runs]
    record_dir = tmp_path / "runs" / "tiny4"
    record_dir.mkdir(parents=True)
    provenance = {"device": "cpu", "device_name": "cpu"}

    def write(run, wall: float, **fields) -> None:
        record = {"schema": 1, "suite": "tiny4", "suite_version": 1, "run_id": run.run_id, "status": "ok",
                  "tier": "smoke", "setting": run.setting, "config": run.config, "metrics": {"top1": 50.0},
                  "wall_time_s": wall, "provenance": provenance, **fields}
        (record_dir / f"{run.run_id}.json").write_text(json.dumps(record))

    modelled = [modelled_seconds(run.typed_config, training_workload(run.typed_config, "cpu"), "cpu")
                for run in runs[:3]]
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
    unseen = _with_train(runs[5], epochs=3)  # a configuration no record measured
    estimate = estimator.estimate(unseen, training_workload(unseen.typed_config, "cpu"))
    expected_scale = (2.0 * modelled[0] + 5.0 * modelled[1]) / (modelled[0] + modelled[1])
    assert estimate.basis == f"cost model x {expected_scale:.2f} (calibrated on cpu records)"
    unseen_modelled = modelled_seconds(unseen.typed_config, training_workload(unseen.typed_config, "cpu"), "cpu")
    assert estimate.seconds == pytest.approx(expected_scale * unseen_modelled)


def test_costs_are_fitted_once_records_span_three_workloads(campaign_suite: str, tmp_path: Path) -> None:
    """Records of workloads that differ in epochs and in evaluation passes, timed as t = a·FLOP time + b·passes + c:
    the estimator recovers a, b and c and predicts an unseen workload with them; a diverged run (it stopped early)
    is left out. Records that differ in their epochs only cannot separate the costs: one scale instead."""
    from repro.execute.estimate import cost_terms
    from repro.tasks.workload import training_workload

    plan = plan_suite(campaign_suite, "smoke", tmp_path, Estimator(tmp_path, "cpu"), {})
    record_dir = tmp_path / "runs" / "tiny4"
    record_dir.mkdir(parents=True)
    a, b, c = 0.5, 0.012, 3.0

    def wall(config: dict) -> float:
        typed = typed_config(config)
        terms = cost_terms(typed, training_workload(typed, "cpu"), "cpu")
        return a * terms.flop_seconds + b * terms.passes + c

    workloads = [(1, 1000), (2, 1000), (4, 1000), (2, 1), (8, 1)]  # (epochs, evaluation batch)

    def write(index: int, epochs: int, eval_batch_size: int) -> None:
        item = plan.runs[index]
        config = json.loads(json.dumps(item.run.config))
        config["train"].update(epochs=epochs, eval_batch_size=eval_batch_size)
        diverged = index == 4
        record = {"schema": 1, "suite": "tiny4", "suite_version": 1, "run_id": f"run{index}",
                  "status": "diverged" if diverged else "ok", "tier": "smoke", "setting": item.run.setting,
                  "config": config, "metrics": {"top1": None if diverged else 50.0},
                  "wall_time_s": 1.0 if diverged else wall(config),
                  "provenance": {"device": "cpu", "device_name": "cpu"}}
        (record_dir / f"run{index}.json").write_text(json.dumps(record))

    unseen = _with_train(plan.runs[5].run, epochs=5, eval_batch_size=7)
    for index in range(3):
        write(index, *workloads[index])
    unseen_workload = training_workload(unseen.typed_config, "cpu")
    assert Estimator(tmp_path, "cpu").estimate(unseen, unseen_workload).basis.startswith("cost model x ")
    for index in range(3, 5):
        write(index, *workloads[index])
    estimate = Estimator(tmp_path, "cpu").estimate(unseen, unseen_workload)
    assert estimate.seconds == pytest.approx(wall(unseen.config), rel=1e-6)
    assert estimate.basis.startswith("cost model fitted to 4 cpu records (0.50 x FLOP time + 12.00 ms per pass + "
                                     "3.0 s per run")


def test_a_train_run_of_a_saved_recipe_is_planned_as_reporting_it(suites_dir: Path, tmp_path: Path) -> None:
    """reader trains saver's two models without saving them: listed first or second, its runs are planned after
    saver's, without their training (the cost model's per-run cost only), and its own models are not waited for."""
    from repro.execute.estimate import DEVICE_RATES

    saving = "citation: none\ntask_options: {save_checkpoint: true}"
    (suites_dir / "saver.yaml").write_text(textwrap.dedent(TINY_SUITE.format(name="saver").replace("citation: none",
                                                                                                     saving)))
    (suites_dir / "reader.yaml").write_text(textwrap.dedent(TINY_SUITE.format(name="reader")))
    for suites in (["reader", "saver"], ["saver", "reader"]):
        plans = Campaign(suites, "smoke", 600.0, tmp_path, device="cpu", echo=lambda _: None).plans(kind="cpu")
        by_suite = {plan.suite.name: plan for plan in plans}
        assert all(item.saves_model for item in by_suite["saver"].runs)
        assert not any(item.saves_model for item in by_suite["reader"].runs)
        assert [item.estimate.seconds for item in by_suite["reader"].runs] == [DEVICE_RATES["cpu"].seconds_per_run] * 2
        assert all(item.estimate.seconds > DEVICE_RATES["cpu"].seconds_per_run for item in by_suite["saver"].runs)
        ordered = order_runs(plans)
        for item in by_suite["reader"].runs:
            saver_first = [other for other in ordered if other.model_key == item.model_key]
            assert [other.suite.name for other in saver_first] == ["saver", "reader"]


@pytest.mark.slow
def test_workers_record_what_one_process_records_and_wait_for_a_model_being_trained(suites_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """Two suites train the same two models, the first saving them; on two workers the second suite's runs wait for
    the first's and report the saved trainings instead of training them again beside it."""
    saving = "citation: none\ntask_options: {save_checkpoint: true}"
    (suites_dir / "saver.yaml").write_text(textwrap.dedent(TINY_SUITE.format(name="saver").replace("citation: none",
                                                                                                     saving)))
    (suites_dir / "reader.yaml").write_text(textwrap.dedent(TINY_SUITE.format(name="reader")))
    records = {}
    for name, executor in (("here", SequentialExecutor()), ("workers", WorkerExecutor(2))):
        results = tmp_path / name
        summary = Campaign(["saver", "reader"], "smoke", 600.0, results, device="cpu", executor=executor,
                           echo=lambda _: None).run()
        assert len(summary.ran) == 4 and summary.statuses == {"ok": 4}
        records[name] = [r for suite in ("saver", "reader") for r in iter_records(results, suite)]
    assert [computed_fields(r) for r in records["workers"]] == [computed_fields(r) for r in records["here"]]
    for normalizer in ("bn", "gn"):
        pair = [r for r in records["workers"] if r["setting"]["normalizer"] == normalizer]
        loaded = [bool(r["extra"].get("from_checkpoint")) for r in pair]
        assert loaded == [False, True], "trained beside the run that was training the same model"


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_only_its_runs(campaign_suite: str, tmp_path: Path) -> None:
    """SIGKILL one of two workers once a run has completed: the campaign ends without raising, names the runs it
    lost, and still leaves every completed record, the check and the archive."""
    results, archive = tmp_path / "results", tmp_path / "window.tar.gz"
    campaign = Campaign([campaign_suite], "smoke", 600.0, results, device="cpu", archive=archive,
                        executor=WorkerExecutor(2), echo=lambda _: None)
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


def test_saved_trainings_names_the_suite_of_each_reportable_training(tmp_path: Path) -> None:
    """A checkpoint with its training's result is reportable by another suite's train run (its suite named); one
    with weights and metrics only is not (None); unreadable files and resumable states are left out."""
    import torch

    from repro.tasks.base import saved_trainings

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    weights = {"state_dict": {"w": torch.zeros(2)}, "metrics": {"top1": 1.0}}
    torch.save({**weights, "result": {"curve": [], "wall_time_s": 1.0}, "suite": "saver"}, checkpoints / "a.pt")
    torch.save(weights, checkpoints / "b.pt")
    torch.save(weights, checkpoints / "a.resume.pt")
    (checkpoints / "c.pt").write_bytes(b"not a checkpoint")
    assert saved_trainings(tmp_path) == {"a": "saver", "b": None}
