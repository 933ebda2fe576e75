"""A training step's device operations and host round trips, counted on the meta device (repro.train.operations)."""

import json

import pytest
import torch

from repro.norms import create_normalizer
from repro.tasks.config import DatasetSpec, ModelSpec, NormalizerChoice, RunConfig
from repro.tasks.train import TrainOptions
from repro.tasks.workload import REFERENCE_BACKBONE, step_pass_weight
from repro.train.config import TrainConfig
from repro.train.operations import OperationCounter, step_recipe, training_step_operations

META = torch.device("meta")
#: the micro-batch suites' normalizers, CBN with a burn-in and a window that fill during the count
NORMALIZERS = {"bn": {}, "gn": {"groups": 8}, "brn": {"warmup_steps": 0, "r_max_ramp_steps": 4, "d_max_ramp_steps": 4},
               "cbn": {"window": 4, "burnin_epochs": 1}, "cbn_naive": {"window": 3, "burnin_iterations": 2},
               "mimicnorm": {}, "fixup": {}}


def _count(normalizer: str, train: dict, exact_recipe: bool = False):
    recipe = json.dumps(train) if exact_recipe else step_recipe(train)
    return training_step_operations("test_resnet", normalizer, json.dumps(NORMALIZERS[normalizer], sort_keys=True),
                                    True, (1, 28, 28), 10, recipe)


def test_the_counter_counts_kernels_not_views_and_sees_host_data():
    x, host = torch.zeros(4, 3, device=META), torch.ones(4, 3)
    with OperationCounter() as counter:
        y = (x + 1).t().reshape(-1)  # one kernel; transpose and view launch none (the reshape of a transpose copies)
        x.mul_(2)
        torch.where(x > 0, x, 0.0)  # the 0.0 travels with the launch
        x.add_(torch.tensor(1.0))  # so does a 0-d host tensor
        x.float()  # already float32: no operation
        torch.tensor([1.0, 2.0], device=META)  # made from Python numbers: a blocking host-to-device copy
        x.copy_(host)  # a host tensor into a device one
        host.add_(1)  # on the host: no device operation
        host.sum().item()  # a value read into Python (counted wherever it is: on a device it waits for it)
    assert dict(counter.operations) == {"add": 1, "clone": 1, "mul_": 1, "gt": 1, "where": 1, "add_": 1, "copy_": 1}
    assert dict(counter.round_trips) == {"tensor from Python data": 1, "copy_ (host and device)": 1, "item": 1}
    assert y.shape == (12,)


@pytest.mark.parametrize("micro_batch", [None, 2])
@pytest.mark.parametrize("normalizer", sorted(NORMALIZERS))
def test_a_training_step_makes_no_host_round_trip(normalizer, micro_batch):
    """Ghost-batch BatchNorm used to build its running-average coefficients from Python lists in every layer:
    two blocking copies per layer and step on a GPU."""
    ops = _count(normalizer, {"epochs": 1, "batch_size": 8, "lr": 0.1, "micro_batch": micro_batch}, exact_recipe=True)
    assert ops.host_round_trips == 0, ops.round_trips_by_name
    assert ops.device_operations > 0


@pytest.mark.parametrize("normalizer", sorted(NORMALIZERS))
def test_the_count_depends_neither_on_the_batch_nor_on_the_number_of_ghost_groups(normalizer):
    """What lets ``step_recipe`` count every micro-batch size of a suite once."""
    def count(batch: int, micro_batch: int | None) -> float:
        train = {"epochs": 1, "batch_size": batch, "lr": 0.1, "micro_batch": micro_batch}
        return _count(normalizer, train, exact_recipe=True).device_operations

    assert count(4, 2) == count(16, 2) == count(16, 8)
    assert count(4, None) == count(16, None)


@pytest.mark.parametrize("normalizer", sorted(NORMALIZERS))
def test_the_steps_repeat_as_the_normalizer_says(normalizer):
    """Counted over two of ``step_pattern``'s periods the mean is that of one: the count is of the steady state."""
    from repro.models import build_model
    from repro.train.config import TrainConfig
    from repro.train.loop import _forward_backward

    with META:
        model = build_model("test_resnet", normalizer, num_classes=10, in_chans=1, small_input=True,
                            **NORMALIZERS[normalizer])
    model.train()
    norm = model.normalizer
    norm.before_training(model, 1)
    first, period = norm.step_pattern(1)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, micro_batch=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    images, labels = torch.zeros(8, 1, 28, 28, device=META), torch.zeros(8, dtype=torch.long, device=META)
    per_period = []
    for step in range(first + 3 * period):
        counter = OperationCounter()
        with counter:
            _forward_backward(model, images, labels, cfg, META, torch.Generator(), True)
            optimizer.step()
            norm.after_step(model)
        if step >= first and (step - first) % period == 0:
            per_period.append(0)
        if step >= first:
            per_period[-1] += sum(counter.operations.values())
    assert per_period[0] == per_period[1] == per_period[2]


def test_cbn_declares_its_burn_in_and_window():
    assert create_normalizer("cbn", window=4, burnin_epochs=2).step_pattern(10) == (25, 3)
    assert create_normalizer("cbn", window=1).step_pattern(10) == (2, 1)
    assert create_normalizer("bn").step_pattern(10) == (1, 1)


def _config(normalizer: str, micro_batch: int | None, backbone: str = "test_resnet") -> RunConfig:
    return RunConfig(task="train", seed=0, backbone=backbone,
                     normalizer=NormalizerChoice(normalizer, normalizer, NORMALIZERS.get(normalizer, {})),
                     dataset=DatasetSpec(name="fashion_mnist"), model=ModelSpec(small_input=True),
                     train=TrainConfig(epochs=2, batch_size=32, lr=0.1, micro_batch=micro_batch),
                     task_options=TrainOptions())


def test_a_training_step_weighs_by_its_operations_against_a_plain_batchnorm_step_of_the_reference_backbone():
    assert step_pass_weight(_config("bn", None, backbone=REFERENCE_BACKBONE)) == 1.0
    plain = step_pass_weight(_config("bn", None))
    assert step_pass_weight(_config("bn", 32)) == plain  # one micro-batch of the whole batch is the plain step
    ghost = step_pass_weight(_config("bn", 4))
    plain_count = _count("bn", {"epochs": 1, "batch_size": 32, "lr": 0.1}).device_operations
    ghost_count = _count("bn", {"epochs": 1, "batch_size": 32, "lr": 0.1, "micro_batch": 4}).device_operations
    assert ghost / plain == pytest.approx(ghost_count / plain_count)
    assert ghost_count / plain_count > 1.5  # the folds, group statistics and running averages per layer
    assert step_pass_weight(_config("cbn", 4)) > ghost  # windows of past statistics and their Taylor terms


def test_a_backbone_that_launches_more_kernels_per_step_weighs_more():
    """MobileNetV2's inverted residuals ask more than twice the operations of a ResNet-18 step (a GPU window's
    MobileNetV2-0.5 run outlasted the estimate that weighed both alike)."""
    reference = _config("bn", None, backbone=REFERENCE_BACKBONE)
    reference_count = training_step_operations(
        REFERENCE_BACKBONE, "bn", "{}", True, (1, 28, 28), 10, step_recipe(reference.train.model_dump())
    ).device_operations
    mobilenet_count = training_step_operations(
        "mobilenetv2_050", "bn", "{}", True, (1, 28, 28), 10, step_recipe(reference.train.model_dump())
    ).device_operations
    weight = step_pass_weight(_config("bn", None, backbone="mobilenetv2_050"))
    assert weight == pytest.approx(mobilenet_count / reference_count) and weight > 2


def test_a_step_that_cannot_be_counted_weighs_one_and_says_so():
    with pytest.warns(UserWarning, match="no_such_backbone under bn: its training step could not be counted"):
        assert step_pass_weight(_config("bn", 4, backbone="no_such_backbone")) == 1.0


def test_only_an_accelerator_weighs_a_step_by_its_operations():
    """On the CPU an operation costs its arithmetic: a CBN step is weighed as one pass there."""
    from repro.tasks.workload import training_workload

    config = _config("cbn", 4)
    steps, eval_batches = 60_000 // 32, -(-10_000 // 1000)  # TrainConfig's evaluation batch: 1000
    assert training_workload(config, "cpu").passes == 2 * (steps + eval_batches)
    assert training_workload(config, "cuda").passes == 2 * (steps * step_pass_weight(config) + eval_batches)
