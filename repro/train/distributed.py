"""Data-parallel training in the processes torchrun starts: every optimizer batch is sharded across the ranks.

Every rank builds the same model and an identically seeded loader, so all ranks draw the same global batch, and
rank r trains on the r-th of world_size equal slices (split further if ``micro_batch`` is set). DDP averages the
gradients, so world_size ranks with slices of b images compute what the one-process run with ``micro_batch=b``
computes, CBN's per-micro-batch windows included. What differs: BatchNorm running statistics (DDP hands every rank
rank 0's at each forward; the simulation updates them with each micro-batch in turn), hence evaluation; BRN's
training output, which uses those running statistics; and mixup draws.

This module knows the process group, not the training loop: ``repro.train.loop.train_data_parallel`` is what
every process runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d, convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from repro.errors import UserError
from repro.train.config import TrainConfig

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Synchronize plain BatchNorms across ranks (timm's converter, which keeps BatchNormAct2d's activation).

    Subclasses such as BRN or CBN would silently become plain SyncBatchNorm, so they are refused.
    """
    variants = sorted({type(m).__name__ for m in model.modules()
                       if isinstance(m, _BatchNorm) and type(m) not in (nn.BatchNorm2d, BatchNormAct2d)})
    if variants:
        raise UserError(f"sync_batchnorm only synchronizes plain BatchNorm, not {', '.join(variants)}")
    return convert_sync_batchnorm(model)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the process group and the collective operations the trainer needs."""

    rank: int
    world_size: int
    device: torch.device
    sync_batchnorm: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_sizes(self, cfg: TrainConfig, where: str = "train") -> None:
        if cfg.batch_size % self.world_size:
            raise UserError(f"{where}: batch_size {cfg.batch_size} is not a multiple of the {self.world_size} "
                            "processes")
        per_rank = cfg.batch_size // self.world_size
        if cfg.micro_batch is not None and per_rank % cfg.micro_batch:
            raise UserError(f"{where}: micro_batch {cfg.micro_batch} does not divide the {per_rank} images per "
                            "process")

    def shard(self, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice of each global batch."""
        size = len(batches[0]) // self.world_size
        return tuple(batch[self.rank * size : (self.rank + 1) * size] for batch in batches)

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """DDP around ``model`` (whose BatchNorms are first converted in place when ``sync_batchnorm`` is set)."""
        if self.sync_batchnorm:
            if self.device.type != "cuda":
                raise UserError("sync_batchnorm needs CUDA: torch's SyncBatchNorm has no CPU implementation")
            model = to_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum_over_ranks(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All-reduced sums of scalar tensors, in one collective (as float32)."""
        stacked = torch.stack([t.float() for t in tensors])
        dist.all_reduce(stacked)
        return tuple(stacked.unbind())

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before each forward."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_data_parallel(sync_batchnorm: bool = False, use_cuda: bool | None = None) -> DataParallel:
    """Join the process group that torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

    NCCL on ``cuda:LOCAL_RANK`` when CUDA is used (by default: when it is available), gloo on CPU otherwise.
    """
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(f"data-parallel training runs under torchrun; environment variables missing: {missing}")
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available() if use_cuda is None else use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DataParallel(rank, world_size, device, sync_batchnorm)
