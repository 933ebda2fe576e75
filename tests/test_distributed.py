"""Data-parallel training: 2 gloo processes × micro-batch b reproduce the one-process micro-batch simulation."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from repro.data import ImageDataset, load_dataset
from repro.errors import UserError
from repro.models import build_model
from repro.train import TrainConfig, seed_everything, train_and_evaluate
from repro.train.distributed import DataParallel, to_sync_batchnorm, train_data_parallel

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
def test_two_processes_reproduce_the_micro_batch_simulation(normalizer, data, tmp_path):
    """Same training losses, accuracies and weights; evaluation differs (running statistics, see distributed.py).

    The ranks are forked, not spawned: spawned processes re-import torch and timm, ~15 s on 2 shared cores.
    """
    mp.start_processes(_rank_main, args=(_free_port(), normalizer, data, tmp_path), nprocs=WORLD_SIZE, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

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
