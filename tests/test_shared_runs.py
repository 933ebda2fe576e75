"""A setting whose numbers cannot change along a grid axis runs once and is reported for every value."""

import textwrap
from pathlib import Path

import pytest
import torch

from repro.execute import run_suite
from repro.execute.base import SuiteRequest
from repro.execute.campaign import Campaign
from repro.execute.estimate import Estimator
from repro.execute.local import WorkerExecutor, run_workers
from repro.execute.plan import order_runs, plan_suite
from repro.store.records import iter_records
from repro.suite.expand import expand
from repro.suite.load import load_suite
from repro.tasks import train as train_task
from repro.tasks.train import TrainTask

SUITE = """\
name: shared
version: 1
description: GN and BN along micro-batches
citation: none
dataset: {name: fashion_mnist, train_subset: 64, test_subset: 32, generated: true}
backbones: [test_resnet]
normalizers: [bn, {name: gn, options: {group_size: 8}}]
model: {small_input: true}
seeds: [0]
train: {epochs: 1, batch_size: 16, lr: 0.05, eval_batch_size: 32, mixup_alpha: MIXUP}
task_options: {step_time_vs_bn: true}
grid:
  train.micro_batch: [4, 8]
tiers:
  full: {}
  smoke: {}
"""


def _write_suite(directory: Path, mixup: float) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "shared.yaml").write_text(textwrap.dedent(SUITE).replace("MIXUP", str(mixup)))


def test_fmnist_microbatch_shares_gn_and_fixup_along_the_micro_batch():
    suite, _ = load_suite("fmnist-microbatch")
    runs = expand(suite, "full")
    by_id = {run.run_id: run for run in runs}
    shared = [run for run in runs if run.shared_with]
    assert {run.setting["normalizer"] for run in shared} == {"gn", "fixup"}
    # 2 normalizers, 2 seeds, 4 of the 5 micro-batches: seed 0 trains at every micro-batch (unshared_seeds)
    assert len(shared) == 2 * 2 * 4 and all(run.setting["seed"] != 0 for run in shared)
    for run in shared:
        primary = by_id[run.shared_with]
        assert primary.shared_with is None and primary.setting["train.micro_batch"] == 2
        assert {k: v for k, v in primary.setting.items() if k != "train.micro_batch"} == {
            k: v for k, v in run.setting.items() if k != "train.micro_batch"}


def test_shared_runs_have_records_for_every_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    suites = tmp_path / "suites"
    _write_suite(suites, mixup=0.0)
    monkeypatch.setenv("REPRO_SUITES_DIR", str(suites))
    trained = []
    real_run = TrainTask.run
    monkeypatch.setattr(TrainTask, "run",
                        lambda self, run, ctx: trained.append(run.setting) or real_run(self, run, ctx))
    monkeypatch.setattr(train_task, "step_time_against_bn", lambda run, model, data, cfg, device: {
        "step_time_vs_bn": float(cfg.micro_batch)})  # records which micro-batch was timed
    run_suite("shared", "smoke", results_dir=tmp_path / "results", device="cpu", progress=False, echo=lambda _: None)
    records = {(r["setting"]["normalizer"], r["setting"]["train.micro_batch"]): r
               for r in iter_records(tmp_path / "results", "shared")}
    assert len(records) == 4 and len(trained) == 3  # bn at both micro-batches, gn once
    primary = records[("gn", 4)]
    assert primary["shared_from"] is None
    record = records[("gn", 8)]
    assert record["shared_from"] == primary["run_id"] and record["status"] == "ok"
    assert record["metrics"]["top1"] == primary["metrics"]["top1"] and record["curve"] == primary["curve"]
    assert record["metrics"]["step_time_vs_bn"] == 8  # timed again, at this run's micro-batch
    assert all(records[("bn", m)]["shared_from"] is None for m in (4, 8))


def test_mixup_makes_the_micro_batch_matter_to_every_normalizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write_suite(tmp_path, mixup=0.2)
    monkeypatch.setenv("REPRO_SUITES_DIR", str(tmp_path))
    suite, _ = load_suite("shared")
    assert not any(run.shared_with for run in expand(suite, "smoke"))


def test_a_train_run_reports_the_same_training_saved_by_another_suite(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """``fmnist-baseline`` and ``fmnist-normalizers`` train the same BN models: the second suite loads them."""
    suites = tmp_path / "suites"
    suites.mkdir()
    for name, options in (("saver", "{save_checkpoint: true}"), ("reader", "{}")):
        text = textwrap.dedent(SUITE).replace("MIXUP", "0.0").replace("name: shared", f"name: {name}")
        text = text.replace("{step_time_vs_bn: true}", options).replace("[4, 8]", "[4]")
        (suites / f"{name}.yaml").write_text(text.replace("normalizers: [bn, {name: gn, options: {group_size: 8}}]",
                                                          "normalizers: [bn]"))
    monkeypatch.setenv("REPRO_SUITES_DIR", str(suites))
    results = tmp_path / "results"
    run_suite("saver", "smoke", results_dir=results, device="cpu", progress=False, echo=lambda _: None)
    (checkpoint,) = (results / "checkpoints").glob("*.pt")  # as if its training had been resumed after epoch 1
    payload = torch.load(checkpoint, weights_only=False)
    payload["result"]["extra"] = {"resumed_at_epochs": [1]}
    torch.save(payload, checkpoint)
    monkeypatch.setattr(train_task, "train_and_evaluate", lambda *args, **kwargs: pytest.fail("trained again"))
    run_suite("reader", "smoke", results_dir=results, device="cpu", progress=False, echo=lambda _: None)
    (saved,), (reported,) = iter_records(results, "saver"), iter_records(results, "reader")
    assert reported["metrics"] == saved["metrics"] and reported["curve"] == saved["curve"]
    assert reported["extra"]["from_checkpoint"] and reported["run_id"] != saved["run_id"]
    assert reported["extra"]["resumed_at_epochs"] == [1]  # the reported training's record says what it said
    # the saving suite itself trains again (repro run --force must recompute)
    monkeypatch.undo()
    monkeypatch.setenv("REPRO_SUITES_DIR", str(suites))
    summary = run_suite("saver", "smoke", results_dir=results, device="cpu", progress=False, echo=lambda _: None,
                        force=True)
    assert summary.ran and "from_checkpoint" not in iter_records(results, "saver")[0]["extra"]


def test_a_campaign_orders_a_shared_run_right_after_the_run_it_copies(tmp_path: Path):
    """fmnist-microbatch's full tier: its shared runs cost nothing, so by value alone they would come first and,
    finding no record to copy, compute their numbers themselves."""
    plan = plan_suite("fmnist-microbatch", "full", tmp_path, Estimator(tmp_path, "h200"), {})
    ordered = order_runs([plan])
    position = {item.run.run_id: index for index, item in enumerate(ordered)}
    shared = [item for item in ordered if item.run.shared_with]
    assert len(shared) == 16  # seeds 1 and 2 only: seed 0 is unshared
    assert all(position[item.run.shared_with] < position[item.run.run_id] for item in shared)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["repro run --workers", "repro campaign --workers"])
def test_workers_copy_a_shared_run_instead_of_computing_it_beside_its_primary(
        executor: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    suites = tmp_path / "suites"
    _write_suite(suites, mixup=0.0)
    monkeypatch.setenv("REPRO_SUITES_DIR", str(suites))
    results = tmp_path / "results"
    if executor == "repro run --workers":
        run_workers(SuiteRequest("shared", "smoke", "cpu", results, progress=False), 2, echo=lambda _: None)
    else:
        Campaign(["shared"], "smoke", 600.0, results, device="cpu", executor=WorkerExecutor(2),
                 echo=lambda _: None).run()
    records = {(r["setting"]["normalizer"], r["setting"]["train.micro_batch"]): r
               for r in iter_records(results, "shared")}
    assert len(records) == 4
    assert records[("gn", 8)]["shared_from"] == records[("gn", 4)]["run_id"]
    assert records[("gn", 8)]["metrics"]["top1"] == records[("gn", 4)]["metrics"]["top1"]
