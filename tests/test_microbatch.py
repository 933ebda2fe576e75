"""The trainer's micro-batch simulation computes the gradients of separately normalized chunks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from repro.data import load_dataset, make_loader
from repro.models import build_model
from repro.train import TrainConfig, seed_everything
from repro.train.loop import _forward_backward

torch.set_num_threads(1)

BATCH, MICRO_BATCH = 16, 4
CPU = torch.device("cpu")
NORMALIZERS = {
    "bn": {},
    "gn": {"group_size": 8},
    "brn": {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0, "r_max_ramp_steps": 0, "d_max_ramp_steps": 0},
}


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("fashion_mnist").subset(BATCH, 1)
    loader = make_loader(data.train, BATCH, train=False, device=CPU, mean=data.mean, std=data.std)
    return next(iter(loader))


def _model(normalizer: str) -> torch.nn.Module:
    seed_everything(0)
    return build_model("test_resnet", normalizer, num_classes=10, in_chans=1, **NORMALIZERS[normalizer])


def _simulated_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.1, micro_batch=MICRO_BATCH)
    model.train()
    _forward_backward(model, images, labels, cfg, CPU, torch.Generator().manual_seed(0))
    return [p.grad for p in model.parameters()]


def _chunks(images: torch.Tensor, labels: torch.Tensor):
    return zip(images.split(MICRO_BATCH), labels.split(MICRO_BATCH), strict=True)


@pytest.mark.parametrize("normalizer", sorted(NORMALIZERS))
def test_simulation_equals_explicit_per_chunk_passes(normalizer, batch):
    """One model, chunks in order (BRN's running statistics move from chunk to chunk in both)."""
    images, labels = batch
    model = _model(normalizer)
    reference = copy.deepcopy(model).train()
    simulated = _simulated_gradients(model, images, labels)
    params = list(reference.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for x, y in _chunks(images, labels):
        chunk_grads = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
        for total, grad in zip(expected, chunk_grads, strict=True):
            total += grad * (len(y) / BATCH)
    for got, want in zip(simulated, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("normalizer", ["bn", "gn"])
def test_simulation_equals_averaging_over_replicas(normalizer, batch):
    """Data-parallel arithmetic: each chunk on its own copy of the model, gradients averaged."""
    images, labels = batch
    model = _model(normalizer)
    replicas = [copy.deepcopy(model).train() for _ in range(BATCH // MICRO_BATCH)]
    simulated = _simulated_gradients(model, images, labels)
    for replica, (x, y) in zip(replicas, _chunks(images, labels), strict=True):
        F.cross_entropy(replica(x), y).backward()
    for index, got in enumerate(simulated):
        want = torch.stack([list(r.parameters())[index].grad for r in replicas]).mean(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _trained_gn_loss(micro_batch: int | None, sequential: bool) -> float:
    """Two steps of a GN test_resnet on random 16x16 images; the final training loss, to the last bit."""
    from repro.data import ImageDataset, TensorSplit
    from repro.train.loop import train_and_evaluate

    generator = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 10, (32,), generator=generator))
    data = ImageDataset("random", split, split, 10, (0.5,), (0.25,), "test")
    seed_everything(0)
    model = build_model("test_resnet", "gn", num_classes=10, in_chans=1, small_input=True, groups=8)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, micro_batch=micro_batch, sequential_micro_batches=sequential,
                      eval_batch_size=32)
    result = train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=0, progress=False)
    return result.metrics["train_loss"]


def test_sequential_micro_batches_compute_what_one_ghost_pass_does_not():
    """GN in one ghost pass is the whole batch's arithmetic, bit for bit; one pass per micro-batch is another
    computation of the same function: equal up to float rounding only (what an unshared seed measures)."""
    whole = _trained_gn_loss(None, sequential=False)
    assert _trained_gn_loss(2, sequential=False) == whole
    sequential = _trained_gn_loss(2, sequential=True)
    assert sequential != whole and sequential == pytest.approx(whole, rel=1e-4)


def test_an_unshared_seed_trains_its_micro_batches_one_pass_each():
    from repro.suite.expand import expand
    from repro.suite.load import load_suite

    suite, _ = load_suite("fmnist-microbatch")
    runs = {(r.setting["normalizer"], r.setting["train.micro_batch"], r.setting["seed"]): r
            for r in expand(suite, "laptop")}
    assert runs["gn", 2, 0].config["train"]["sequential_micro_batches"] is True
    assert "sequential_micro_batches" not in runs["gn", 32, 0].config["train"]  # the whole batch: nothing to split
    assert "sequential_micro_batches" not in runs["bn", 2, 0].config["train"]  # BN is not invariant: it shares nothing
