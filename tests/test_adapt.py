"""Adaptation methods: each one against its definition, computed here from the batch itself."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from repro.adapt import ADAPTATION_METHODS, create_method
from repro.adapt.evaluate import evaluate_corruptions
from repro.adapt.tent import softmax_entropy
from repro.errors import UserError
from repro.models import build_model

torch.set_num_threads(1)

EPS = 1e-5


class RenormLikeBN(nn.BatchNorm2d):
    """Stand-in for a BN subclass with its own training-time forward (Batch Renorm, Cross-Iteration BN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return 2.0 * out + 1.0 if self.training else out


def give_source_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as a trained model would have."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
            if module.affine:
                module.weight.data.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.data.copy_(0.2 * torch.randn(c, generator=generator))
    return model


def bn_convnet(norm: type[nn.Module] = nn.BatchNorm2d, classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), norm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )
    return give_source_statistics(model).eval()


def logits_bn_net(classes: int = 5) -> nn.Module:
    """MimicNorm-like: no BN in the body, a BatchNorm1d without affine on the logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, classes), nn.BatchNorm1d(classes, affine=False))
    return give_source_statistics(model).eval()


def shifted_batch(n: int = 16, size: int = 8, seed: int = 1) -> torch.Tensor:
    """A test batch whose statistics differ from the source ones (scaled and shifted)."""
    return 1.5 * torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) + 0.7


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_and_options():
    assert set(ADAPTATION_METHODS.names()) == {"source", "ptbn", "bn_adapt", "tent", "sar", "eata", "tbr", "rbn"}
    with pytest.raises(UserError, match="pseudo_samples"):
        create_method("bn_adapt", bn_convnet())
    with pytest.raises(UserError, match="bad options"):
        create_method("tent", bn_convnet(), momentun=0.9)
    with pytest.raises(UserError, match="optimizer"):
        create_method("tent", bn_convnet(), optimizer="rmsprop")
    with pytest.raises(UserError):
        create_method("bn_adapt", bn_convnet(), pseudo_samples=-1)


def test_forward_only_says_whether_a_method_goes_backward():
    """The time estimates count a forward-only method's images as forward passes alone (tasks/tta.py)."""
    model, x = bn_convnet(), shifted_batch()
    for name in ADAPTATION_METHODS.names():
        method = create_method(name, model, **({"pseudo_samples": 16.0} if name == "bn_adapt" else {}))
        method.predict(x)
        method.predict(x)
        assert (method.backward_images == 0) == method.forward_only, name


def test_source_is_eval_mode_and_leaves_the_model_alone():
    model = bn_convnet()
    x = shifted_batch()
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    assert torch.equal(create_method("source", model).predict(x), expected)
    tent = create_method("tent", model, optimizer="adam", lr=1e-2)
    for _ in range(3):
        tent.predict(x)
    assert states_equal(snapshot(model), before) and not model.training


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, BatchNormAct2d, RenormLikeBN])
def test_ptbn_equals_train_mode_bn_and_keeps_running_stats(norm):
    model = bn_convnet(norm)
    plain = bn_convnet(BatchNormAct2d if norm is BatchNormAct2d else nn.BatchNorm2d)
    plain.load_state_dict(model.state_dict())
    x = shifted_batch()
    with torch.no_grad():
        expected = plain.train()(x)
    method = create_method("ptbn", model)
    assert len(method.adapted_layers) == 2 and method.adapts
    before = snapshot(method.model)
    assert torch.allclose(method.predict(x), expected, atol=1e-6)
    assert states_equal(snapshot(method.model), before)


def test_ptbn_on_a_timm_resnet_adapts_every_bn():
    model = give_source_statistics(build_model("resnet18", "bn", num_classes=5, small_input=True)).eval()
    method = create_method("ptbn", model)
    assert len(method.adapted_layers) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = shifted_batch(4, 16)
    with torch.no_grad():
        expected = copy.deepcopy(model).train()(x)
    assert torch.allclose(method.predict(x), expected, atol=1e-5)


def test_bn_adapt_limits():
    model = bn_convnet()
    x = shifted_batch()
    ptbn = create_method("ptbn", model).predict(x)
    source = create_method("source", model).predict(x)
    assert torch.allclose(create_method("bn_adapt", model, pseudo_samples=0, unbiased=False).predict(x), ptbn,
                          atol=1e-6)
    for huge in (1e12, float("inf")):
        assert torch.allclose(create_method("bn_adapt", model, pseudo_samples=huge).predict(x), source, atol=1e-5)


def expected_mixed_bn(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, pseudo_samples: float,
                      unbiased: bool) -> torch.Tensor:
    """Schneider et al.'s formula computed by hand: per-channel moments over every axis but the channel axis."""
    n = x.shape[0]
    channels_last = x.transpose(0, 1).reshape(x.shape[1], -1)
    m = channels_last.shape[1]
    batch_mean = channels_last.sum(1) / m
    batch_var = ((channels_last - batch_mean[:, None]) ** 2).sum(1) / (m - 1 if unbiased else m)
    prior = pseudo_samples / (pseudo_samples + n)
    mean = prior * bn.running_mean + (1 - prior) * batch_mean
    var = prior * bn.running_var + (1 - prior) * batch_var
    shape = (1, -1) + (1,) * (x.ndim - 2)
    normalized = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    if bn.affine:
        normalized = normalized * bn.weight.view(shape) + bn.bias.view(shape)
    return normalized


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize(("layer", "shape", "pseudo_samples"), [
    (nn.BatchNorm2d(3), (4, 3, 5, 5), 8.0),
    (nn.BatchNorm2d(3), (3, 3, 5, 5), 8.0),  # a smaller (last) batch: λ uses its own n
    (nn.BatchNorm2d(3), (1, 3, 5, 5), 16.0),  # batch size 1: the variance comes from the 25 pixels
    (nn.BatchNorm1d(6, affine=False), (10, 6), 4.0),
])
def test_bn_adapt_mixes_statistics_as_defined(layer, shape, pseudo_samples, unbiased):
    model = give_source_statistics(nn.Sequential(layer)).eval()
    x = shifted_batch().flatten()[: torch.Size(shape).numel()].reshape(shape)
    method = create_method("bn_adapt", model, pseudo_samples=pseudo_samples, unbiased=unbiased,
                           adapt_1d=isinstance(layer, nn.BatchNorm1d))
    with torch.no_grad():
        expected = expected_mixed_bn(x, layer, pseudo_samples, unbiased)
    assert torch.allclose(method.predict(x), expected, atol=1e-5)


def test_bn_adapt_at_batch_size_one():
    x = shifted_batch(1)
    out = create_method("bn_adapt", bn_convnet(), pseudo_samples=16).predict(x)
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_1d_batchnorm_is_adapted_only_when_asked():
    model = logits_bn_net()
    x = shifted_batch()
    source = create_method("source", model).predict(x)
    default = create_method("ptbn", model)
    assert not default.adapts and torch.equal(default.predict(x), source)
    adapted = create_method("ptbn", model, adapt_1d=True)
    logits = adapted.predict(x)
    with torch.no_grad():  # batch statistics on the logits: each class column standardized over the batch
        raw = model[:-1](x)
        expected = (raw - raw.mean(0)) / torch.sqrt(raw.var(0, correction=0) + EPS)
    assert torch.allclose(logits, expected, atol=1e-5)
    # one sample has no variance: that layer keeps its source statistics
    assert torch.allclose(adapted.predict(x[:1]), source[:1], atol=1e-6)
    tent = create_method("tent", model, adapt_1d=True)
    assert tent.adapts and tent.optimizer is None
    assert torch.allclose(tent.predict(x), logits, atol=1e-6)


def test_tent_updates_only_bn_affine_and_returns_the_pre_update_prediction():
    model = bn_convnet()
    x = shifted_batch()
    ptbn = create_method("ptbn", model).predict(x)
    tent = create_method("tent", model, optimizer="adam", lr=1e-3)
    initial = snapshot(tent.model)
    first = tent.predict(x)
    # the prediction comes from the unchanged parameters with batch statistics: that is ptbn's output
    assert torch.allclose(first, ptbn, atol=1e-6)
    after = snapshot(tent.model)
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    affine = {f"{i}.layer.{p}" for i in (1, 4) for p in ("weight", "bias")}
    assert changed == affine
    assert not torch.allclose(tent.predict(x), first)


def test_tent_lowers_entropy_on_a_repeated_batch():
    tent = create_method("tent", bn_convnet(), optimizer="adam", lr=1e-3)
    x = shifted_batch()
    entropies = [softmax_entropy(tent.predict(x)).mean().item() for _ in range(6)]
    assert all(later < earlier for earlier, later in itertools.pairwise(entropies))


def test_tent_reset_restores_the_initial_state():
    tent = create_method("tent", bn_convnet(), optimizer="sgd", lr=0.05)
    initial = snapshot(tent.model)
    x = shifted_batch()
    first = tent.predict(x)
    for seed in range(3):
        tent.predict(shifted_batch(seed=seed + 2))
    assert tent.optimizer.state  # momentum buffers exist
    tent.reset()
    assert states_equal(snapshot(tent.model), initial)
    assert not tent.optimizer.state
    assert torch.equal(tent.predict(x), first)


def test_tent_episodic_resets_before_every_batch():
    tent = create_method("tent", bn_convnet(), optimizer="adam", lr=1e-2, episodic=True)
    x = shifted_batch()
    assert torch.equal(tent.predict(x), tent.predict(x))


def test_tent_optimizers():
    sgd = create_method("tent", bn_convnet()).optimizer
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["lr"] == 0.00025 and sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"]
    adam = create_method("tent", bn_convnet(), optimizer="adam", lr=1e-3).optimizer
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.9, 0.999)
    # only the four BN affine tensors are optimized
    assert sum(len(g["params"]) for g in adam.param_groups) == 4


@pytest.mark.parametrize("normalizer", ["gn", "none"])
def test_models_without_bn_fall_back_to_source(normalizer):
    options = {"group_size": 8} if normalizer == "gn" else {}
    model = build_model("resnet18", normalizer, num_classes=5, small_input=True, **options).eval()
    x = shifted_batch(4, 16)
    with torch.no_grad():
        expected = model(x)
    for name, options in [("ptbn", {}), ("bn_adapt", {"pseudo_samples": 16}), ("tent", {"lr": 1.0})]:
        method = create_method(name, model, **options)
        before = snapshot(method.model)
        assert not method.adapts
        assert torch.equal(method.predict(x), expected)
        assert states_equal(snapshot(method.model), before)


def test_batch_statistics_outside_batchnorm_layers_are_an_error():
    model = build_model("resnet18", "gn", num_classes=5, small_input=True, group_size=8)
    model.normalizer.has_batch_statistics = True  # as if the normalizer kept statistics in a non-BN layer
    with pytest.raises(UserError, match="no BatchNorm layer"):
        create_method("ptbn", model)


def test_running_stats_free_bn_needs_batch_statistics():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)).eval()
    x = shifted_batch()
    assert torch.allclose(create_method("ptbn", model).predict(x), F.batch_norm(x, None, None, training=True),
                          atol=1e-6)
    with pytest.raises(UserError, match="running statistics"):
        create_method("bn_adapt", model, pseudo_samples=4).predict(x)


# --- evaluation over corruption × severity views -------------------------------------------------------------

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def gaussian_noise(images: torch.Tensor, severity: int) -> torch.Tensor:
    noise = 8.0 * severity * torch.randn(images.shape, generator=torch.Generator().manual_seed(severity))
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def lower_contrast(images: torch.Tensor, severity: int) -> torch.Tensor:
    mean = images.float().mean(dim=(1, 2, 3), keepdim=True)
    return ((images.float() - mean) * (1 - 0.15 * severity) + mean).round().clamp(0, 255).to(torch.uint8)


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "contrast": lower_contrast}


def clean_images(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(n) % 5


def normalized(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def recording(method_class: type) -> type:
    """The method, with every batch it sees and every prediction it returns kept in ``seen`` / ``returned``."""

    class Recording(method_class):
        def predict(self, batch: torch.Tensor) -> torch.Tensor:
            logits = super().predict(batch)
            self.seen.append(batch.clone())
            self.returned.append(logits.clone())
            return logits

    return Recording


def recorded(name: str, model: nn.Module, **options):
    method = recording(ADAPTATION_METHODS.get(name))(model, **options)
    method.seen, method.returned = [], []
    return method


def test_evaluate_rows_match_a_direct_computation():
    images, labels = clean_images()
    model = bn_convnet()

    def view(corruption, severity):
        return CORRUPTIONS[corruption](images, severity), labels

    for name in ("source", "ptbn"):
        rows = evaluate_corruptions(create_method(name, model), view, list(CORRUPTIONS), [1, 3], mean=MEAN, std=STD,
                                    batch_size=len(labels))
        assert [(r["corruption"], r["severity"]) for r in rows] == [
            ("gaussian_noise", 1), ("contrast", 1), ("gaussian_noise", 3), ("contrast", 3)]
        for row in rows:
            reference = copy.deepcopy(model).train(name == "ptbn")  # one batch: ptbn = train-mode BN on all of it
            with torch.no_grad():
                predictions = reference(normalized(view(row["corruption"], row["severity"])[0])).argmax(1)
            wrong = (predictions != labels).sum().item()
            assert row["error"] == pytest.approx(100 * wrong / len(labels))
            assert (row["method"], row["batch_size"], row["n"], row["adapted"]) == (name, 50, 50, name == "ptbn")


def test_evaluation_order_is_shuffled_once_and_shared_across_methods():
    n, batch_size = 50, 16
    index_images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()

    def view(corruption, severity):
        return index_images, torch.arange(n) % 5

    def order_seen(method) -> list[list[int]]:
        """The image indices of every batch, read back from the normalized pixels."""
        pixels = [batch[:, 0, 0, 0] * STD[0] * 255 + MEAN[0] * 255 for batch in method.seen]
        return [p.round().long().tolist() for p in pixels]

    runs = {}
    for key, name, seed in [("source", "source", 0), ("tent", "tent", 0), ("again", "source", 0),
                            ("other_seed", "source", 1), ("file_order", "source", None)]:
        method = recorded(name, bn_convnet(), lr=1e-2) if name == "tent" else recorded(name, bn_convnet())
        evaluate_corruptions(method, view, ["a", "b"], [1, 2], mean=MEAN, std=STD, batch_size=batch_size, seed=seed,
                             grouped=False)
        batches = order_seen(method)
        per_view = len(batches) // 4
        assert [len(b) for b in batches[:per_view]] == [16, 16, 16, 2]
        views = [list(itertools.chain(*batches[i * per_view : (i + 1) * per_view])) for i in range(4)]
        assert all(v == views[0] for v in views)  # every view is read in the same order
        runs[key] = views[0]
    assert sorted(runs["source"]) == list(range(n)) and runs["source"] != list(range(n))
    assert runs["tent"] == runs["source"] == runs["again"]
    assert runs["other_seed"] != runs["source"] and sorted(runs["other_seed"]) == list(range(n))
    assert runs["file_order"] == list(range(n))


def test_reset_per_view_or_online():
    images, labels = clean_images()

    def view(corruption, severity):
        return CORRUPTIONS[corruption](images, severity), labels

    def returned(reset: str, corruptions: list[str]) -> list[torch.Tensor]:
        tent = recorded("tent", bn_convnet(), optimizer="adam", lr=1e-2)
        evaluate_corruptions(tent, view, corruptions, [2], mean=MEAN, std=STD, batch_size=10, reset=reset,
                             grouped=False)  # the per-view loop, call by call
        return tent.returned

    alone = returned("per_view", ["contrast"])
    per_view = returned("per_view", ["gaussian_noise", "contrast"])
    online = returned("online", ["gaussian_noise", "contrast"])
    assert all(torch.equal(a, b) for a, b in zip(alone, per_view[5:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(per_view[:5], online[:5], strict=True))
    assert not any(torch.allclose(a, b) for a, b in zip(alone, online[5:], strict=True))
