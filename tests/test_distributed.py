"""Data-parallel training: 2 gloo processes × micro-batch b reproduce the one-process micro-batch simulation."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from repro.data import ImageDataset, load_dataset
from repro.errors import UserError
from repro.execute import run_suite
from repro.models import build_model
from repro.store.records import iter_records
from repro.train import TrainConfig, loop, seed_everything, train_and_evaluate
from repro.train.distributed import DataParallel, to_sync_batchnorm
from repro.train.loop import train_data_parallel

torch.set_num_threads(1)

WORLD_SIZE = 2
MICRO_BATCH = 4
RECIPE = {"epochs": 3, "batch_size": WORLD_SIZE * MICRO_BATCH, "max_steps_per_epoch": 4, "lr": 0.05,
          "eval_batch_size": 16}


def _model(normalizer: str) -> nn.Module:
    options = {"window": 3} if normalizer == "cbn" else {}
    return build_model("test_resnet", normalizer, num_classes=10, in_chans=1, **options)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, normalizer: str, data: ImageDataset, out: Path) -> None:
    """One process as torchrun would start it: its place in the group comes from the environment."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    built: list[nn.Module] = []
    result = train_data_parallel(lambda: built.append(_model(normalizer)) or built[0], data, TrainConfig(**RECIPE),
                                 seed=0, progress=False)
    torch.save({"curve": result.curve if result else None, "state": built[0].state_dict()}, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    return load_dataset("fashion_mnist").subset(64, 32)


@pytest.mark.parametrize("normalizer", ["bn", "cbn"])
def test_two_processes_reproduce_the_micro_batch_simulation(normalizer, data, tmp_path, monkeypatch):
    """Same training losses, accuracies and weights; evaluation differs (running statistics, see distributed.py).

    The ranks are forked, not spawned: spawned processes re-import torch and timm, ~15 s on 2 shared cores.
    The simulation takes the sequential passes, the arithmetic of each rank: its one-pass form equals them
    (tests/test_ghost_batches.py) but rounds differently, and this tiny recipe amplifies rounding within epochs.
    """
    mp.start_processes(_rank_main, args=(_free_port(), normalizer, data, tmp_path), nprocs=WORLD_SIZE, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    monkeypatch.setattr(loop, "can_run_in_one_pass", lambda model, mixup_alpha=0.0: False)
    seed_everything(0)
    model = _model(normalizer)
    simulated = train_and_evaluate(model, data, TrainConfig(**RECIPE, micro_batch=MICRO_BATCH),
                                   device=torch.device("cpu"), seed=0, progress=False)

    assert ranks[1]["curve"] is None  # only rank 0 reports
    curve = ranks[0]["curve"]
    assert len(curve) == len(simulated.curve) == RECIPE["epochs"]
    for parallel_epoch, simulated_epoch in zip(curve, simulated.curve, strict=True):
        assert parallel_epoch["train_loss"] == pytest.approx(simulated_epoch["train_loss"], rel=1e-5)
        assert parallel_epoch["train_top1"] == simulated_epoch["train_top1"]
    for name, param in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["state"][name], param.detach(), rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_conversion_keeps_fused_activations_and_refuses_variants():
    fused = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    converted = to_sync_batchnorm(fused)
    assert isinstance(converted[1], SyncBatchNormAct) and isinstance(converted[1].act, nn.ReLU)
    assert isinstance(to_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0], nn.SyncBatchNorm)
    with pytest.raises(UserError, match="BatchRenorm2d"):
        to_sync_batchnorm(build_model("test_resnet", "brn", num_classes=10))


@pytest.mark.parametrize(("batch_size", "micro_batch"), [(9, None), (12, 4)])
def test_batches_must_split_evenly_over_processes(batch_size, micro_batch):
    data_parallel = DataParallel(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(UserError):
        data_parallel.check_batch_sizes(TrainConfig(epochs=1, batch_size=batch_size, lr=0.1, micro_batch=micro_batch))


DATA_PARALLEL_SUITE = """
name: dp
version: 1
description: data-parallel test suite
citation: none
dataset: {name: fashion_mnist, train_subset: 64, test_subset: 32, generated: true}
backbones: [test_resnet]
normalizers: [bn, {name: gn, options: {group_size: 8}}]
model: {small_input: true}
seeds: [0]
train: {epochs: 2, batch_size: 16, micro_batch: 4, lr: 0.05, eval_batch_size: 16, max_steps_per_epoch: 3}
tiers: {full: {}, smoke: {}}
"""


def _repro_cli(*args: str, suites: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "REPRO_SUITES_DIR": str(suites), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "repro", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_repro_run_on_two_processes_matches_one_process(tmp_path):
    """``repro run --nproc 2`` (torchrun, gloo) writes one record per run, from rank 0, equal to the 1-process run."""
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "dp.yaml").write_text(DATA_PARALLEL_SUITE)
    parallel = _repro_cli("run", "dp", "--nproc", "2", "--results", str(tmp_path / "two"), "--no-progress",
                          suites=suites)
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    assert parallel.stdout.count("dp (smoke): 2 ran, 0 skipped") == 1  # rank 0 only

    os.environ["REPRO_SUITES_DIR"] = str(suites)
    try:
        run_suite("dp", "smoke", device="cpu", results_dir=tmp_path / "one", progress=False, echo=lambda _: None)
    finally:
        del os.environ["REPRO_SUITES_DIR"]
    two = {r["run_id"]: r for r in iter_records(tmp_path / "two", "dp")}
    one = {r["run_id"]: r for r in iter_records(tmp_path / "one", "dp")}
    assert set(two) == set(one) and len(one) == 2
    for run_id, record in two.items():
        assert record["provenance"]["processes"] == 2 and one[run_id]["provenance"]["processes"] == 1
        for parallel_epoch, single_epoch in zip(record["curve"], one[run_id]["curve"], strict=True):
            assert parallel_epoch["train_loss"] == pytest.approx(single_epoch["train_loss"], rel=1e-5)
        if record["setting"]["normalizer"] == "gn":  # no running statistics: evaluation agrees too
            assert record["metrics"]["top1"] == one[run_id]["metrics"]["top1"]

    rerun = _repro_cli("run", "dp", "--nproc", "2", "--results", str(tmp_path / "two"), suites=suites)
    assert rerun.returncode == 0 and "0 ran, 2 skipped" in rerun.stdout


def test_data_parallel_refuses_runs_without_micro_batch(tmp_path):
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "dp.yaml").write_text(DATA_PARALLEL_SUITE.replace("micro_batch: 4, ", ""))
    refused = _repro_cli("run", "dp", "--nproc", "2", "--results", str(tmp_path / "out"), suites=suites)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "train.micro_batch must be set" in refused.stderr
    assert not (tmp_path / "out").exists()
