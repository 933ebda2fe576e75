"""A training run stopped at a deadline and resumed ends exactly where an uninterrupted run ends."""

from pathlib import Path

import pytest
import torch

from repro.data import load_dataset
from repro.models import build_model
from repro.train import TrainConfig, train_and_evaluate
from repro.train.resume import ResumePolicy


class StepClock:
    """A clock that advances one unit per reading: a deadline becomes "after N readings"."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _train(normalizer: str, cfg: TrainConfig, resume: ResumePolicy | None = None, **options):
    data = load_dataset("fashion_mnist", generated=True).subset(96, 32)
    torch.manual_seed(0)
    model = build_model("test_resnet", normalizer, num_classes=10, in_chans=1, small_input=True, **options)
    result = train_and_evaluate(model, data, cfg, device=torch.device("cpu"), seed=3, progress=False, resume=resume)
    return model, result


@pytest.mark.parametrize(("normalizer", "options", "micro_batch"), [
    ("bn", {}, None),
    ("brn", {"warmup_steps": 2, "r_max_ramp_steps": 4, "d_max_ramp_steps": 4}, None),
    ("cbn", {"window": 3}, 8),
])
def test_resumed_run_equals_uninterrupted(tmp_path: Path, normalizer: str, options: dict, micro_batch) -> None:
    # mixup and augmentation draw from every generator a resumed run must restore
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, mixup_alpha=0.2, crop_padding=2, flip=True,
                      micro_batch=micro_batch, warmup_epochs=1)
    whole_model, whole = _train(normalizer, cfg, **options)

    # The deadline passes during the first epoch: the run stops at its end with a saved state.
    clock = StepClock()
    policy = ResumePolicy(tmp_path / "run.resume.pt", deadline=2.0, clock=clock)
    _, first = _train(normalizer, cfg, policy, **options)
    assert first.status == "stopped" and len(first.curve) == 1
    assert policy.path.is_file()

    resumed_policy = ResumePolicy(tmp_path / "run.resume.pt")
    resumed_model, resumed = _train(normalizer, cfg, resumed_policy, **options)
    assert resumed.status == "ok" and not policy.path.exists()
    assert resumed.extra == {"resumed_at_epochs": [1]} and whole.extra == {}  # the record says it was resumed
    assert [c["test_top1"] for c in resumed.curve] == [c["test_top1"] for c in whole.curve]
    assert [c["train_loss"] for c in resumed.curve] == [c["train_loss"] for c in whole.curve]
    assert resumed.metrics["loss"] == whole.metrics["loss"]
    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_state_is_saved_at_the_interval(tmp_path: Path) -> None:
    clock = StepClock()
    policy = ResumePolicy(tmp_path / "run.resume.pt", every_s=0.5, clock=clock)
    saved_epochs = []
    original_save = policy.save

    def spy(state):
        saved_epochs.append(state["epoch"])
        original_save(state)

    policy.save = spy
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    _, result = _train("bn", cfg, policy)
    assert result.status == "ok"
    assert saved_epochs == [1, 2]  # every epoch end but the last; the finished run deletes it
    assert not policy.path.exists()


def test_an_unreadable_state_is_moved_aside_and_the_run_starts_over(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    state = tmp_path / "run.resume.pt"
    state.write_bytes(b"not a torch file")
    _, result = _train("bn", TrainConfig(epochs=1, batch_size=16, lr=0.05), ResumePolicy(state))
    assert result.status == "ok" and len(result.curve) == 1
    assert [p.name.split(".bad-")[0] for p in tmp_path.glob("*.bad-*")] == ["run.resume.pt"]
    assert "run.resume.pt is unreadable" in capsys.readouterr().err
