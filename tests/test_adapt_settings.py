"""The evaluation settings (episodic, continual, mixed, label_shift) and the grouped evaluation of stateless
methods, against the plain per-batch loop."""

import itertools

import pytest
import torch
from test_adapt import CORRUPTIONS, MEAN, STD, bn_convnet, clean_images, logits_bn_net, recorded

from repro.adapt import ADAPTATION_METHODS, create_method
from repro.adapt.evaluate import Evaluation, evaluate_views
from repro.adapt.orders import dirichlet_label_order
from repro.data.loaders import PixelNormalizer

torch.set_num_threads(1)

VIEWS = [("gaussian_noise", 1), ("contrast", 1), ("gaussian_noise", 3), ("contrast", 3)]


def make_view():
    images, labels = clean_images()

    def view(corruption, severity):
        return CORRUPTIONS[corruption](images, severity), labels

    return view, images, labels


def counting(name: str, **options):
    """The method, counting its resets."""

    class Counting(ADAPTATION_METHODS.get(name)):
        resets = 0

        def reset(self) -> None:
            super().reset()
            type(self).resets += 1

    method = Counting(bn_convnet(), **options)
    Counting.resets = 0
    return method, Counting


@pytest.mark.parametrize("name", ["tent", "sar", "eata", "rbn", "tbr"])
def test_continual_never_resets_and_episodic_always_does(name):
    view, _, _ = make_view()
    options = {"lr": 1e-2} if name in ("tent", "sar", "eata") else {}
    for setting, expected in [("episodic", 1 + len(VIEWS)), ("continual", 1), ("label_shift", 1 + len(VIEWS))]:
        method, cls = counting(name, **options)
        # the per-view loop; episodes side by side (test_tent_episodes_side_by_side_...) reset per block of views
        rows = evaluate_views([Evaluation(method, 10, name)], view, VIEWS, mean=MEAN, std=STD, setting=setting,
                              grouped=False)
        assert cls.resets == expected, setting  # one reset when the evaluation starts (moving to the device)
        assert [r["setting"] for r in rows] == [setting] * len(VIEWS)


def test_continual_carries_the_adaptation_and_episodic_does_not():
    view, _, _ = make_view()

    def returned(setting: str, views) -> list[torch.Tensor]:
        tent = recorded("tent", bn_convnet(), optimizer="adam", lr=1e-2)
        evaluate_views([Evaluation(tent, 10, "tent")], view, views, mean=MEAN, std=STD, setting=setting,
                       grouped=False)  # the per-view loop, call by call
        return tent.returned

    alone = returned("episodic", VIEWS[1:2])
    episodic = returned("episodic", VIEWS[:2])
    continual = returned("continual", VIEWS[:2])
    assert all(torch.equal(a, b) for a, b in zip(alone, episodic[5:], strict=True))
    assert not any(torch.allclose(a, b) for a, b in zip(alone, continual[5:], strict=True))


def test_label_shift_reads_each_view_class_by_class():
    n = 50
    index_images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    labels = torch.arange(n) % 5
    tent = recorded("tent", bn_convnet(), lr=1e-3)
    evaluate_views([Evaluation(tent, 10, "tent")], lambda *_: (index_images, labels), VIEWS[:1], mean=MEAN,
                   std=STD, setting="label_shift")
    seen = torch.cat([(b[:, 0, 0, 0] * STD[0] * 255 + MEAN[0] * 255).round().long() for b in tent.seen]).tolist()
    seen_labels = labels[seen].tolist()
    changes = sum(a != b for a, b in itertools.pairwise(seen_labels))
    assert changes == 4 and sorted(seen) == list(range(n)) and seen_labels != sorted(seen_labels)


def test_mixed_is_one_stream_scored_per_view():
    view, _, labels = make_view()
    tent = recorded("tent", bn_convnet(), lr=1e-3)
    rows = evaluate_views([Evaluation(tent, 10, "tent")], view, VIEWS, mean=MEAN, std=STD, setting="mixed")
    assert [(r["corruption"], r["severity"], r["n"], r["setting"]) for r in rows] == [
        (c, s, len(labels), "mixed") for c, s in VIEWS]
    assert len(tent.seen) == len(VIEWS) * len(labels) // 10  # one stream, reset once
    per_view = evaluate_views([Evaluation(create_method("tent", bn_convnet(), lr=1e-3), 10, "tent")], view, VIEWS,
                              mean=MEAN, std=STD)
    assert [r["error"] for r in rows] != [r["error"] for r in per_view]


@pytest.mark.parametrize(("name", "options", "make_model"), [
    ("source", {}, bn_convnet), ("ptbn", {}, bn_convnet), ("bn_adapt", {"pseudo_samples": 8}, bn_convnet),
    ("bn_adapt", {"pseudo_samples": 8, "unbiased": False}, bn_convnet),
    ("ptbn", {"adapt_1d": True}, logits_bn_net)])  # a BatchNorm1d on the logits: one value per image and channel
def test_grouped_evaluation_equals_the_per_batch_loop(name, options, make_model):
    view, _, _ = make_view()
    model = make_model()

    def rows(grouped: bool) -> list[dict]:
        evaluations = [Evaluation(create_method(name, model, **options), size, name) for size in (1, 4, 7, 50)]
        return evaluate_views(evaluations, view, VIEWS, mean=MEAN, std=STD, grouped=grouped)

    fast, loop = rows(True), rows(False)
    for a, b in zip(fast, loop, strict=True):
        assert (a["batch_size"], a["corruption"], a["severity"], a["error"]) == (
            b["batch_size"], b["corruption"], b["severity"], b["error"])
        for metric in ("ece", "nll", "brier"):
            assert a[metric] == pytest.approx(b[metric], rel=1e-4, abs=1e-6)
        assert a["forward_per_image"] == b["forward_per_image"] == 1.0 and a["backward_per_image"] == 0.0


@pytest.mark.parametrize(("options", "make_model", "setting"), [
    ({"optimizer": "adam", "lr": 1e-2}, bn_convnet, "episodic"),
    ({"optimizer": "sgd", "lr": 5e-2}, bn_convnet, "label_shift"),
    ({"optimizer": "adam", "lr": 1e-2, "adapt_1d": True}, logits_bn_net, "episodic")])  # statistics only
def test_tent_episodes_side_by_side_equal_the_per_view_loop(options, make_model, setting, monkeypatch):
    """Each view's episode alone after a reset, against all of them in one forward per step; 3 views per
    forward at batch 64 and blocks of 2 + 2 at batch 100 cover full, partial and single-view blocks."""
    import repro.adapt.grouping as grouping

    monkeypatch.setattr(grouping, "GROUPED_IMAGES", 200)
    monkeypatch.setattr(grouping, "GROUPED_BELOW", {})  # every batch size, as on a GPU
    view, images, labels = make_view()
    model = make_model()

    def rows(grouped: bool) -> list[dict]:
        evaluations = [Evaluation(create_method("tent", model, **options), size, f"tent{size}")
                       for size in (1, 7, 64, 100)]
        return evaluate_views(evaluations, view, VIEWS, mean=MEAN, std=STD, grouped=grouped, setting=setting,
                              clean=(images[:20], labels[:20]))

    together, loop = rows(True), rows(False)
    assert [(r["method"], r["corruption"], r["severity"]) for r in together] == [
        (r["method"], r["corruption"], r["severity"]) for r in loop]
    for a, b in zip(together, loop, strict=True):
        assert a["error"] == b["error"], (a["method"], a["corruption"], a["severity"])
        assert a["clean_error_after"] == b["clean_error_after"]
        for metric in ("ece", "nll", "brier"):
            assert a[metric] == pytest.approx(b[metric], rel=1e-4, abs=1e-5)
        assert a["forward_per_image"] == b["forward_per_image"] == 1.0
        assert a["backward_per_image"] == b["backward_per_image"]
    adapted = [r for r in loop if r["batch_size"] < 100]
    assert len({r["nll"] for r in adapted}) == len(adapted)  # the episodes differ, so they were not confused


def test_tent_episodes_side_by_side_return_the_per_view_logits():
    """The logits themselves, step by step, against each view's episode run alone (float tolerance)."""
    view, _, _ = make_view()
    model = bn_convnet()
    normalize = PixelNormalizer(MEAN, STD, torch.device("cpu"), channels_last=False)
    parts = [normalize(view(corruption, severity)[0]) for corruption, severity in VIEWS]
    alone = []
    for images in parts:
        tent = recorded("tent", model, optimizer="adam", lr=1e-2)
        for batch in images.split(5):
            tent.predict(batch)
        alone.append(torch.cat(tent.returned))
    tent = recorded("tent", model, optimizer="adam", lr=1e-2)
    stacked = torch.stack(parts)
    with tent.episodes(len(parts)):
        for batch in stacked.split(5, dim=1):
            tent.predict(batch.flatten(0, 1))
    together = torch.cat([step.unflatten(0, (len(parts), -1)) for step in tent.returned], 1)
    for view_logits, expected in zip(together, alone, strict=True):
        torch.testing.assert_close(view_logits, expected, rtol=1e-4, atol=1e-4)


def test_clean_error_after_adaptation_only_for_stateful_methods():
    view, images, labels = make_view()
    model = bn_convnet()
    evaluations = [Evaluation(create_method(name, model, **options), 10, name)
                   for name, options in [("ptbn", {}), ("tent", {"lr": 1e-2}), ("rbn", {})]]
    rows = evaluate_views(evaluations, view, VIEWS[:2], mean=MEAN, std=STD, clean=(images, labels))
    assert ["clean_error_after" in r for r in rows] == [False, True, True] * 2
    assert all(0 <= r["clean_error_after"] <= 100 for r in rows if "clean_error_after" in r)


def test_dirichlet_label_shift_is_a_permutation_correlated_by_gamma():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    order = torch.randperm(2000, generator=generator)

    def changes(gamma: float) -> int:
        stream = dirichlet_label_order(order, labels, gamma, seed=3)
        assert sorted(stream.tolist()) == list(range(2000))
        assert torch.equal(stream, dirichlet_label_order(order, labels, gamma, seed=3))  # reproducible
        seen = labels[stream].tolist()
        return sum(a != b for a, b in itertools.pairwise(seen))

    # γ → 0: each class falls whole into one slot, so the label changes at most once per class and once per slot
    # boundary (≤ 2·10); large γ: each of the 10 slots holds a chunk of all 10 classes (≥ 9 changes per slot)
    shuffled = sum(a != b for a, b in itertools.pairwise(labels[order].tolist()))
    assert changes(1e-3) <= 2 * 10 and changes(1e3) >= 9 * 10 and changes(1e3) < shuffled


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_estimated_passes_are_the_forwards_the_evaluator_makes(device_type, monkeypatch):
    """The time estimate's pass count (``evaluation_passes``) against the forwards counted on the model, with the
    CPU's grouping rule and with a GPU's (every batch size grouped)."""
    import repro.adapt.grouping as grouping
    from repro.adapt.grouping import evaluation_passes

    monkeypatch.setattr(grouping, "GROUPED_IMAGES", 20)
    if device_type == "cuda":
        monkeypatch.setattr(grouping, "GROUPED_BELOW", {})
    view, images, labels = make_view()
    clean = (images[:9], labels[:9])
    methods = [("source", {}), ("ptbn", {}), ("tent", {"lr": 1e-3}), ("tent", {"lr": 1e-3, "episodic": True}),
               ("rbn", {})]
    for name, options in methods:
        for batch_size in (1, 3, 7, 64):
            method = create_method(name, bn_convnet(), **options)
            forwards: list[int] = []
            method.model.register_forward_hook(lambda *_, calls=forwards: calls.append(1))
            evaluate_views([Evaluation(method, batch_size, name)], view, VIEWS, mean=MEAN, std=STD, clean=clean)
            expected = evaluation_passes(type(method), options, batch_size, len(labels), len(VIEWS), "episodic",
                                         len(clean[1]), "cpu" if device_type == "cpu" else "cuda")
            assert len(forwards) == expected, (name, options, batch_size)
