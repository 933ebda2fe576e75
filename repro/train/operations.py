"""What one training step asks of a device, counted without one: its operations and its host round trips.

On a GPU a small model's step at 28 px is bound by how many kernels it launches, not by its FLOPs, and any
tensor made from Python numbers or read back into Python stalls the host until the device catches up. Both are
properties of the code path, not of the device, so they are counted here by running the step on PyTorch's
``meta`` device (shapes only, no data) under a dispatch mode, which takes the accelerator's code paths
(``repro.norms.ghost.grouped_statistics`` is false only on the CPU) in well under a second.

The count is of ATen operations that produce data (views and allocations launch nothing); one operation is about
one kernel. Not counted: bf16 autocast's weight casts (the same for every normalizer), the loader's augmentation and
the loop's running sums (the same for every configuration).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: operations that only describe memory (views, allocations, metadata) and launch no kernel
KERNEL_FREE = frozenset({
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "chunk", "detach", "empty", "empty_like",
    "empty_strided", "expand", "expand_as", "flatten", "narrow", "new_empty", "new_empty_strided", "permute",
    "promote_types", "reshape", "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose",
    "unbind", "unflatten", "unsqueeze", "view", "view_as", "_record_function_enter_new", "_record_function_exit",
    "lift_fresh",  # hands a tensor already made to autograd; its copy, if any, is counted as a round trip
    "scalar_tensor",  # a Python number wrapped for an operation: on a GPU a host scalar passed with the launch
})

#: copies, which move data between the host and the device when their input and output sit on different ones
COPIES = frozenset({"_to_copy", "copy_"})


def _devices(tree) -> set[str]:
    return {t.device.type for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


class OperationCounter(TorchDispatchMode):
    """Counts device operations by name (those whose output is on the device), and host round trips: values read
    back (``.item()``), tensors made on the device from Python data, and copies between host and device memory.
    A Python number or 0-d host tensor given to a device operation is neither: it travels with the kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: collections.Counter[str] = collections.Counter()
        self.round_trips: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        out_devices = _devices(out)
        on_device = bool(out_devices - {"cpu"})
        if name == "_local_scalar_dense":
            self.round_trips["item"] += 1
        elif name in COPIES and len(_devices((args, kwargs)) | out_devices) > 1:
            self.round_trips[f"{name} (host and device)"] += 1
        elif name == "lift_fresh" and on_device:
            self.round_trips["tensor from Python data"] += 1
        if on_device and name not in KERNEL_FREE:
            self.operations[name] += 1
        return out


@dataclass(frozen=True)
class StepOperations:
    """One optimizer step of training in steady state (``Normalizer.step_pattern``): per step, averaged over the
    pattern's period; the names' counts are over the whole period."""

    device_operations: float
    host_round_trips: float
    by_name: tuple[tuple[str, int], ...]
    round_trips_by_name: tuple[tuple[str, int], ...]


@functools.cache
def training_step_operations(backbone: str, normalizer: str, options_json: str, small_input: bool,
                             image_shape: tuple[int, int, int], num_classes: int, train_json: str) -> StepOperations:
    """Count the trainer's step (``zero_grad``, forward and backward as ``repro.train.loop`` does them, SGD, the
    normalizer's per-step hook) for one configuration, channels-last as the trainer runs on a GPU."""
    from repro.models import build_model
    from repro.norms.ghost import can_run_in_one_pass
    from repro.train.config import TrainConfig
    from repro.train.loop import _forward_backward, make_optimizer

    cfg = TrainConfig.model_validate(json.loads(train_json))
    meta = torch.device("meta")
    with meta:
        model = build_model(backbone, normalizer, num_classes=num_classes, in_chans=image_shape[0],
                            small_input=small_input, **json.loads(options_json))
    model.to(memory_format=torch.channels_last).train()
    norm = model.normalizer
    norm.before_training(model, 1)  # burn-ins counted in epochs end after the first step
    optimizer = make_optimizer(model, cfg, foreach=True)  # a few multi-tensor kernels, as the fused one is
    images = torch.zeros(cfg.batch_size, *image_shape, device=meta).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=meta)
    one_pass = can_run_in_one_pass(model, cfg.mixup_alpha)
    mixup = torch.Generator()  # mixup's draws happen on the host; on meta they only need a generator to exist
    first, period = norm.step_pattern(1)
    counter = OperationCounter()
    for step in range(first + period):
        with counter if step >= first else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            _forward_backward(model, images, labels, cfg, meta, mixup, one_pass)
            optimizer.step()
            norm.after_step(model)
    return StepOperations(sum(counter.operations.values()) / period, sum(counter.round_trips.values()) / period,
                          tuple(counter.operations.most_common()), tuple(sorted(counter.round_trips.items())))


#: the recipe fields that change what a step computes (the rest change only which values it computes with)
STEP_FIELDS = ("batch_size", "micro_batch", "mixup_alpha", "label_smoothing", "momentum", "nesterov", "weight_decay")


def step_recipe(train: dict) -> str:
    """A training recipe reduced to what decides its step's operations, as JSON: the cache key of
    ``training_step_operations``. Neither the batch size nor the number of ghost groups changes the count (every
    ghost layer works on all groups at once), so a step at whole-batch statistics is counted at batch 4 and one in
    micro-batches at 2 groups of 2; with mixup, micro-batches are sequential passes and keep their number."""
    from repro.train.config import TrainConfig

    full = TrainConfig.model_validate(train).model_dump()
    recipe = {name: full[name] for name in STEP_FIELDS} | {"epochs": 1, "lr": 0.1}
    micro_batch = full["micro_batch"]
    if not full["mixup_alpha"]:
        grouped = micro_batch is not None and micro_batch < full["batch_size"]
        recipe |= {"batch_size": 4, "micro_batch": 2 if grouped else None}
    return json.dumps(recipe, sort_keys=True)
