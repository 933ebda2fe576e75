"""Training and evaluation of one run: data on the device, bf16 autocast (CUDA; CPU on request) and channels-last,
exact seeding."""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from repro.data import ImageDataset, make_loader
from repro.norms.ghost import can_run_in_one_pass, ghost_batches
from repro.train.config import TrainConfig
from repro.train.distributed import DataParallel, init_data_parallel
from repro.train.resume import ResumePolicy
from repro.train.schedule import lr_multiplier
from repro.train.state import TrainingState

#: how often (in steps) the loop reads the loss back to check it and update the progress bar (only with progress on)
SYNC_EVERY = 20


@dataclass
class TrainResult:
    status: str  # "ok", "diverged", or "stopped" (at a deadline, with a resumable state saved)
    metrics: dict[str, Any]
    curve: list[dict[str, float]]
    wall_time_s: float
    images_per_s: float
    peak_memory_mb: float
    diverged_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device, enabled: bool, on_cpu: bool = False):
    """bf16 autocast on CUDA when ``enabled`` (``TrainConfig.amp``), on the CPU when ``on_cpu`` (``amp_cpu``)."""
    if (device.type == "cuda" and enabled) or (device.type == "cpu" and on_cpu):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA allocator peak on GPU; the process's peak resident set on CPU (a whole-process high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = True,
             data_parallel: DataParallel | None = None, amp_cpu: bool = False) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy over a loader, with the model in eval mode.

    Data-parallel: every rank uses rank 0's buffers and evaluates every world_size-th batch; the sums are all-reduced.
    """
    model.eval()
    if data_parallel is not None:
        data_parallel.broadcast_buffers(model)
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for index, (images, labels) in enumerate(loader):
        if data_parallel is not None and index % data_parallel.world_size != data_parallel.rank:
            continue
        with autocast(device, amp, amp_cpu):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    if data_parallel is not None:
        correct, loss_sum, count = data_parallel.sum_over_ranks(correct, loss_sum, count)
    return (100.0 * correct / count).item(), (loss_sum / count).item()


def _mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator):
    """Mixup (Zhang et al. 2018) within the batch: returns mixed images, the partner labels and the weight."""
    lam = torch.distributions.Beta(alpha, alpha).sample().item() if alpha > 0 else 1.0
    partner = torch.randperm(len(labels), device=labels.device, generator=generator)
    return lam * images + (1 - lam) * images[partner], labels[partner], lam


def _forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                      device: torch.device, generator: torch.Generator, one_pass: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one optimizer batch, split into micro-batches when ``cfg.micro_batch`` is set.

    Each micro-batch goes through the model on its own (its own normalization statistics) and gradients
    accumulate, weighted by micro-batch size: the arithmetic of data-parallel training without synchronized BN.
    With ``one_pass`` (``repro.norms.ghost.can_run_in_one_pass``) the same arithmetic is one forward over the batch
    with per-micro-batch BatchNorm statistics. Returns the batch's summed loss and number of correct predictions,
    both on the device.
    """
    chunk = cfg.micro_batch or len(labels)
    ghost: contextlib.AbstractContextManager = contextlib.nullcontext()
    if one_pass and chunk < len(labels) and len(labels) % chunk == 0:
        ghost, chunk = ghost_batches(model, chunk), len(labels)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for start in range(0, len(labels), chunk):
        x, y = images[start : start + chunk], labels[start : start + chunk]
        if cfg.mixup_alpha > 0:
            x, y_partner, lam = _mixup(x, y, cfg.mixup_alpha, generator)
        precision = autocast(device, cfg.amp, cfg.amp_cpu)
        with _gradient_sync(model, last_chunk=start + chunk >= len(labels)), ghost, precision:
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if cfg.mixup_alpha > 0:
            loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y_partner, label_smoothing=cfg.label_smoothing)
        (loss * (len(y) / len(labels))).backward()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    return loss_sum, correct


def make_optimizer(model: nn.Module, cfg: TrainConfig, **implementation: Any) -> torch.optim.SGD:
    """The recipe's SGD over the normalizer's parameter groups; ``implementation``: ``fused`` or ``foreach``."""
    normalizer = getattr(model, "normalizer", None)
    groups = (normalizer.param_groups(model, cfg.lr, cfg.weight_decay) if normalizer is not None
              else [{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}])
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, **implementation)


def _gradient_sync(model: nn.Module, last_chunk: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients after every backward; within a batch only the last micro-batch's needs to."""
    if isinstance(model, DistributedDataParallel) and not last_chunk:
        return model.no_sync()
    return contextlib.nullcontext()


def train_and_evaluate(model: nn.Module, data: ImageDataset, cfg: TrainConfig, *, device: torch.device, seed: int,
                       progress: bool = True, description: str = "", data_parallel: DataParallel | None = None,
                       resume: ResumePolicy | None = None) -> TrainResult:
    """Train ``model`` on ``data.train`` with ``cfg`` and evaluate on ``data.test`` after every epoch.

    A non-finite loss ends the run with status ``diverged`` and the step at which it happened.
    With ``resume`` (one process only) the run continues from a saved state, saves its state at epoch ends
    as the policy says, and stops with status ``stopped`` when another epoch would pass the deadline.
    With ``data_parallel`` (see ``repro.train.distributed``) this rank trains on its slice of every batch, losses
    and counts are summed over ranks (so every rank returns the same metrics), and only rank 0 shows progress.
    """
    on_cuda = device.type == "cuda"
    channels_last = cfg.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: the fastest algorithms, picked once
    loader_args = {"device": device, "mean": data.mean, "std": data.std, "channels_last": channels_last}
    train_loader = make_loader(data.train, cfg.batch_size, train=True, crop_padding=cfg.crop_padding, flip=cfg.flip,
                               seed=seed, **loader_args)
    test_loader = make_loader(data.test, cfg.eval_batch_size, train=False, **loader_args)
    train_model = model
    if data_parallel is not None:
        data_parallel.check_batch_sizes(cfg)
        train_model = data_parallel.wrap(model)
        progress = progress and data_parallel.is_main
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(data.train)} training images")

    normalizer = getattr(model, "normalizer", None)
    if normalizer is not None:
        normalizer.before_training(model, steps_per_epoch)
    # the fused CUDA kernel: one launch for every parameter instead of a few per parameter
    optimizer = make_optimizer(model, cfg, fused=on_cuda or None)
    one_pass = (data_parallel is None and not cfg.sequential_micro_batches
                and can_run_in_one_pass(model, cfg.mixup_alpha))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch))
    state = TrainingState(model, optimizer, scheduler, train_loader,
                          torch.Generator(device=device).manual_seed(seed + 1), device)
    first_bad_step = torch.full((), -1, device=device)  # set on the device, read back only every SYNC_EVERY steps
    if data_parallel is not None:
        resume = None  # every rank would have to save and agree; data-parallel runs restart instead
    if resume is not None:
        state.load(resume)
    record_extra = state.record_extra()
    while state.epoch < cfg.epochs:
        loss_sum, correct, seen, epoch_start = _train_epoch(state, train_model, cfg, steps_per_epoch, one_pass,
                                                            first_bad_step, data_parallel, progress, description)
        if first_bad_step.item() >= 0:
            return _diverged(int(first_bad_step), state, state.trained_images + seen, record_extra)
        synchronize(device)
        epoch_time = time.perf_counter() - epoch_start
        state.train_time += epoch_time
        state.trained_images += seen
        train_loss = loss_sum.item() / seen
        test_top1, test_loss = evaluate(model, test_loader, device, cfg.amp, data_parallel, cfg.amp_cpu)
        state.epoch += 1
        state.curve.append({
            "epoch": state.epoch, "train_loss": train_loss, "train_top1": 100 * correct.item() / seen,
            "test_top1": test_top1, "test_loss": test_loss, "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time,
        })
        if progress:
            tqdm.write(f"{description} epoch {state.epoch}/{cfg.epochs}: train loss {train_loss:.4f}, "
                       f"test top-1 {test_top1:.2f}%, {seen / epoch_time:.0f} img/s")
        if not math.isfinite(test_loss):
            return _diverged(state.step, state, state.trained_images, record_extra)
        if resume is not None and state.epoch < cfg.epochs:
            stop = resume.should_stop(time.perf_counter() - epoch_start)
            if stop or resume.should_save():
                state.save(resume)
            if stop:
                return TrainResult("stopped", {}, state.curve, state.wall_time_s(),
                                   state.trained_images / max(state.train_time, 1e-9), peak_memory_mb(device))
    if resume is not None:
        resume.discard()

    curve, last = state.curve, state.curve[-1]
    metrics = {
        "top1": last["test_top1"], "top1_error": 100 - last["test_top1"], "loss": last["test_loss"],
        "best_top1": max(c["test_top1"] for c in curve),
        "train_loss": last["train_loss"], "epoch_time_s": state.train_time / cfg.epochs,
        "step_time_ms": 1000 * state.train_time / max(state.step, 1),
    }
    return TrainResult("ok", metrics, curve, state.wall_time_s(), state.trained_images / state.train_time,
                       peak_memory_mb(device), extra=record_extra)


def _train_epoch(state: TrainingState, train_model: nn.Module, cfg: TrainConfig, steps_per_epoch: int,
                 one_pass: bool, first_bad_step: torch.Tensor, data_parallel: DataParallel | None, progress: bool,
                 description: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The optimizer steps of the state's next epoch: the summed loss and correct predictions (on the device), the
    images they came from, and when the epoch started (``time.perf_counter()``). The first non-finite loss's step
    goes to ``first_bad_step``; with progress on, the epoch stops at the next read-back after it (without, divergence
    is checked at the epoch's end)."""
    model, device = state.model, state.device
    normalizer = getattr(model, "normalizer", None)
    model.train()
    synchronize(device)
    epoch_start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    bar = tqdm(total=steps_per_epoch, desc=f"{description} epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not progress, leave=False, mininterval=1.0, dynamic_ncols=True)
    for batch_index, (images, labels) in enumerate(state.loader):
        if batch_index >= steps_per_epoch:
            break
        state.optimizer.zero_grad(set_to_none=True)
        local_batch = (images, labels) if data_parallel is None else data_parallel.shard(images, labels)
        batch_loss, batch_correct = _forward_backward(train_model, *local_batch, cfg, device, state.mix_generator,
                                                      one_pass)
        if data_parallel is not None:  # global sums, so that every rank takes the same divergence decisions
            batch_loss, batch_correct = data_parallel.sum_over_ranks(batch_loss, batch_correct)
        state.optimizer.step()
        state.scheduler.step()
        if normalizer is not None:
            normalizer.after_step(model)
        loss_sum += batch_loss
        correct += batch_correct
        seen += len(labels)
        state.step += 1
        first_bad_step.copy_(torch.where((first_bad_step < 0) & ~torch.isfinite(batch_loss), state.step,
                                         first_bad_step))
        if progress and (state.step % SYNC_EVERY == 0 or batch_index == steps_per_epoch - 1):
            if first_bad_step.item() >= 0:
                break
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.update(1)
    bar.close()
    return loss_sum, correct, seen, epoch_start


def _diverged(step: int, state: TrainingState, images: int, extra: dict[str, Any]) -> TrainResult:
    """Record a run whose loss became NaN or infinite; the best accuracy reached so far is kept."""
    metrics: dict[str, Any] = {"top1": None, "loss": None}
    if state.curve:
        metrics["best_top1"] = max(c["test_top1"] for c in state.curve)
    return TrainResult("diverged", metrics, state.curve, state.wall_time_s(),
                       images / state.train_time if state.train_time else 0.0, peak_memory_mb(state.device),
                       diverged_step=step, extra=extra)


def train_data_parallel(make_model: Callable[[], nn.Module], data: ImageDataset, cfg: TrainConfig, *, seed: int,
                        sync_batchnorm: bool = False, progress: bool = True, description: str = ""
                        ) -> TrainResult | None:
    """Called by every process torchrun starts: join the group, build the model, train and evaluate, leave.

    ``make_model`` is called after seeding and must build the same model on every rank. Returns the run's
    ``TrainResult`` on rank 0 and ``None`` on the other ranks (the metrics are global sums, the same everywhere),
    so that only rank 0 writes records. Progress output comes from rank 0 only.
    """
    data_parallel = init_data_parallel(sync_batchnorm)
    try:
        seed_everything(seed)
        result = train_and_evaluate(make_model(), data, cfg, device=data_parallel.device, seed=seed,
                                    progress=progress, description=description, data_parallel=data_parallel)
    finally:
        dist.destroy_process_group()
    return result if data_parallel.is_main else None
