"""What a run computes, in the units of the time estimates (``repro.execute.estimate``): images through
forward and backward, forward-only images, and passes; the datasets' full sizes and image shapes come from their
registry entries, so that a plan needs no data on disk.

Each task reports its run's ``Workload`` (``Task.workload``); the estimator turns workloads into seconds.
A training image costs three forward passes (forward, and a backward of about twice that).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

from repro.data import DATASETS
from repro.data.base import DatasetShape
from repro.tasks.config import DatasetSpec, RunConfig
from repro.train.config import TrainConfig

#: how a dataset that is not registered (a test's stand-in) is planned: CIFAR-10's sizes and shape
UNREGISTERED_SHAPE = DatasetShape(train_images=50_000, test_images=10_000, channels=3, image_size=32, num_classes=10)


def dataset_shape(name: str) -> DatasetShape:
    """The registered dataset's full split sizes and image shape (its registry entry's), so that a plan needs no
    data on disk."""
    return DATASETS.get(name).shape if name in DATASETS else UNREGISTERED_SHAPE


def device_type(kind: str) -> str:
    """The torch device type of a device kind: ``cpu``, else ``cuda``."""
    return "cpu" if kind == "cpu" else "cuda"


@dataclass(frozen=True)
class Workload:
    """What a run computes: images through forward+backward, forward-only images, and passes (launches)."""

    train_images: int = 0
    forward_images: int = 0
    passes: float = 0  # pass-equivalents: a training step weighs by its operations (``step_pass_weight``)

    def __add__(self, other: Workload) -> Workload:
        return Workload(self.train_images + other.train_images, self.forward_images + other.forward_images,
                        self.passes + other.passes)


def training_workload(config: RunConfig, device_type: str = "cuda") -> Workload:
    """The train task's work: every epoch trains on the split and evaluates the test split. On an accelerator a
    training step counts as ``step_pass_weight`` passes; on the CPU, where an operation's cost is its arithmetic
    (fmnist-microbatch's laptop CBN and BN steps at micro-batch 32 took the same 62 s), as one."""
    train_n, test_n = split_sizes(config.dataset)
    train = config.train
    steps = train_n // train.batch_size
    if train.max_steps_per_epoch:
        steps = min(steps, train.max_steps_per_epoch)
    eval_batches = -(-test_n // train.eval_batch_size)
    weight = step_pass_weight(config) if device_type != "cpu" else 1.0
    return Workload(train.epochs * steps * train.batch_size, train.epochs * test_n,
                    train.epochs * (steps * weight + eval_batches))


#: the pass every other is weighed against: a BatchNorm training step of this backbone, the kind of run the first
#: H200 window measured (a pass of ResNet-50 or MobileNetV2 asks 2.4 times its operations; MobileNetV2-0.5's
#: full fmnist-normalizers run did not finish in 3.6 minutes where one pass each per step predicted 3.3)
REFERENCE_BACKBONE = "resnet18"


def step_pass_weight(config: RunConfig) -> float:
    """How many passes one training step costs where passes are launch-bound: its device operations
    (``repro.train.operations``) over those of a ``REFERENCE_BACKBONE`` BatchNorm step at whole-batch statistics
    on the same input. A ghost-batch BatchNorm step launches about twice the kernels of a plain one, a
    Cross-Iteration BN step eight times as many; sequential micro-batch passes (mixup) count in full. 1, with a
    warning, where the step cannot be counted (a model that does not build on the meta device)."""
    from repro.train.operations import step_recipe, training_step_operations

    shape = dataset_shape(config.dataset.name)
    chans, size, classes = shape.channels, shape.image_size, shape.num_classes

    def operations(backbone: str, normalizer: str, options: dict[str, Any], train: TrainConfig) -> float:
        return training_step_operations(backbone, normalizer, json.dumps(options, sort_keys=True),
                                        config.model.small_input, (chans, size, size), classes,
                                        step_recipe(train.model_dump())).device_operations

    plain_step = config.train.model_copy(update={"micro_batch": None, "mixup_alpha": 0.0})
    try:
        return (operations(config.backbone, config.normalizer.name, config.normalizer.options, config.train)
                / operations(REFERENCE_BACKBONE, "bn", {}, plain_step))
    except Exception as err:  # every setting of the committed suites is counted (138 of them); say when one is not
        warnings.warn(f"time estimate: {config.backbone} under {config.normalizer.name}: its training step "
                      f"could not be counted on the meta device ({type(err).__name__}: {err}); weighed as one "
                      "plain pass", stacklevel=2)
        return 1.0


def split_sizes(dataset: DatasetSpec) -> tuple[int, int]:
    """The run's train and test split sizes: its subsets, capped at the registered dataset's full splits."""
    shape = dataset_shape(dataset.name)
    return (min(dataset.train_subset or shape.train_images, shape.train_images),
            min(dataset.test_subset or shape.test_images, shape.test_images))
