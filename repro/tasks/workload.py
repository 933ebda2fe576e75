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


def training_workload(config: dict[str, Any], device_type: str = "cuda") -> Workload:
    """The train task's work: every epoch trains on the split and evaluates the test split. On an accelerator a
    training step counts as ``step_pass_weight`` passes; on the CPU, where an operation's cost is its arithmetic
    (fmnist-microbatch's laptop CBN and BN steps at micro-batch 32 took the same 62 s), as one."""
    train_n, test_n = split_sizes(config["dataset"])
    train = config["train"]
    batch = train["batch_size"]
    steps = train_n // batch
    if train.get("max_steps_per_epoch"):
        steps = min(steps, train["max_steps_per_epoch"])
    epochs = train["epochs"]
    eval_batches = -(-test_n // train.get("eval_batch_size", batch))
    weight = step_pass_weight(config) if device_type != "cpu" else 1.0
    return Workload(epochs * steps * batch, epochs * test_n, epochs * (steps * weight + eval_batches))


#: the pass every other is weighed against: a BatchNorm training step of this backbone, the kind of run the first
#: H200 window measured (a pass of ResNet-50 or MobileNetV2 asks 2.4 times its operations; MobileNetV2-0.5's
#: full fmnist-normalizers run did not finish in 3.6 minutes where one pass each per step predicted 3.3)
REFERENCE_BACKBONE = "resnet18"


def step_pass_weight(config: dict[str, Any]) -> float:
    """How many passes one training step costs where passes are launch-bound: its device operations
    (``repro.train.operations``) over those of a ``REFERENCE_BACKBONE`` BatchNorm step at whole-batch statistics
    on the same input. A ghost-batch BatchNorm step launches about twice the kernels of a plain one, a
    Cross-Iteration BN step eight times as many; sequential micro-batch passes (mixup) count in full. 1, with a
    warning, where the step cannot be counted (a model that does not build on the meta device)."""
    from repro.train.operations import step_recipe, training_step_operations

    shape = dataset_shape(config["dataset"]["name"])
    chans, size, classes = shape.channels, shape.image_size, shape.num_classes
    small_input = bool(config["model"].get("small_input"))

    def operations(backbone: str, normalizer: str, options: dict[str, Any], train: dict[str, Any]) -> float:
        return training_step_operations(backbone, normalizer, json.dumps(options, sort_keys=True), small_input,
                                        (chans, size, size), classes, step_recipe(train)).device_operations

    train = config["train"]
    try:
        return (operations(config["backbone"], config["normalizer"]["name"], config["normalizer"]["options"], train)
                / operations(REFERENCE_BACKBONE, "bn", {}, {**train, "micro_batch": None, "mixup_alpha": 0.0}))
    except Exception as err:  # every setting of the committed suites is counted (138 of them); say when one is not
        warnings.warn(f"time estimate: {config['backbone']} under {config['normalizer']['name']}: its training step "
                      f"could not be counted on the meta device ({type(err).__name__}: {err}); weighed as one "
                      "plain pass", stacklevel=2)
        return 1.0


def split_sizes(dataset: dict[str, Any]) -> tuple[int, int]:
    shape = dataset_shape(dataset["name"])
    full_train, full_test = shape.train_images, shape.test_images
    return (min(dataset.get("train_subset") or full_train, full_train),
            min(dataset.get("test_subset") or full_test, full_test))
