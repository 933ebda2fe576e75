"""With progress off the training loop reads nothing back from the device within an epoch."""

import pytest
import torch

from repro.data import load_dataset
from repro.models import build_model
from repro.train import TrainConfig, train_and_evaluate


def _reads_back(monkeypatch: pytest.MonkeyPatch, steps: int, progress: bool) -> int:
    """How many ``Tensor.item`` calls one epoch of ``steps`` optimizer steps makes."""
    data = load_dataset("fashion_mnist", generated=True).subset(256, 16)
    torch.manual_seed(0)
    model = build_model("test_resnet", "bn", num_classes=10, in_chans=1, small_input=True)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, max_steps_per_epoch=steps)
    calls = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real_item(self))
    train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=0, progress=progress)
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    return len(calls)


def test_no_reads_per_step_without_progress(monkeypatch: pytest.MonkeyPatch):
    assert _reads_back(monkeypatch, 2, progress=False) == _reads_back(monkeypatch, 25, progress=False)
    # with progress the bar reads the loss back every SYNC_EVERY steps and at the end of the epoch
    assert _reads_back(monkeypatch, 12, progress=True) > _reads_back(monkeypatch, 12, progress=False)
