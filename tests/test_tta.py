"""The ``tta`` task and the on-the-fly corrupted view, on tiny generated datasets."""

import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.corruptions import corrupt
from repro.data import TensorSplit, corrupted
from repro.data.corrupted import GeneratedView, subset_view
from repro.errors import UserError
from repro.execute import run_suite
from repro.store.records import iter_records
from repro.suite import load_suite

SUITE = """
name: {name}
version: 1
description: a tiny tta suite for tests
citation: none
task: tta
dataset: {{name: {dataset}, train_subset: 64, test_subset: 24, generated: true}}
backbones: [test_resnet]
normalizers: [bn, {{name: gn, options: {{group_size: 8}}}}]
seeds: [0]
train: {{epochs: 1, batch_size: 32, lr: 0.05, eval_batch_size: 64}}
task_options:
  methods:
    - name: source
    - name: ptbn
    - {{name: bn_adapt, label: bn_adapt_N8, options: {{pseudo_samples: 8}}}}
    - {{name: tent, options: {{optimizer: adam, lr: 0.001}}, batch_sizes: [8]}}
  corruptions: [gaussian_noise, contrast]
  severities: [1, 5]
  batch_sizes: [4, 8]
  workers: 0
{extra}
tiers:
  full: {{}}
  smoke: {{}}
"""


def write_suite(directory: Path, name: str, dataset: str = "fashion_mnist", extra: str = "") -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(SUITE.format(name=name, dataset=dataset, extra=extra)))
    return path


def run_rows(tmp_path: Path, name: str, **kwargs) -> list[dict]:
    path = write_suite(tmp_path / "suites", name, **kwargs)
    summary = run_suite(path, "smoke", device="cpu", results_dir=tmp_path / "results", progress=False,
                        echo=lambda _: None)
    records = iter_records(tmp_path / "results", name)
    assert not summary.failed, [r["error"] for r in records]
    return records


@pytest.fixture
def views_in_memory() -> OrderedDict:
    """The test's in-memory view store (empty at the start: ``fresh_views_in_memory`` in conftest)."""
    return corrupted._views_in_memory


@pytest.fixture
def no_views_in_memory(views_in_memory: OrderedDict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corrupted, "VIEWS_IN_MEMORY_BYTES", {})


def _measured_removed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "ms_per_image"} for row in rows]


def test_generated_view_is_corrupt_of_the_same_indices_whatever_the_batch(tmp_path, no_views_in_memory):
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 1, 28, 28), dtype=np.uint8))
    split = TensorSplit(images, torch.arange(10))
    expected = corrupt(images, "glass_blur", 3, seed=7, indices=torch.arange(10))
    for batch_size in (1, 3, 16):
        got, labels = GeneratedView(split, seed=7, batch_size=batch_size)("glass_blur", 3)
        assert torch.equal(got, expected) and torch.equal(labels, split.labels)
    cached = GeneratedView(split, seed=7, cache_dir=tmp_path)
    assert torch.equal(cached("glass_blur", 3)[0], expected)
    assert cached.images == 10 and len(list(tmp_path.rglob("glass_blur-3.npy"))) == 1
    again = GeneratedView(split, seed=7, cache_dir=tmp_path)
    assert torch.equal(again("glass_blur", 3)[0], expected) and again.images == 0  # read back, not recomputed
    assert not torch.equal(GeneratedView(split, seed=8)("glass_blur", 3)[0], expected)


def test_views_stay_in_memory_within_a_budget(views_in_memory, monkeypatch: pytest.MonkeyPatch):
    split = TensorSplit(torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), torch.arange(10))
    monkeypatch.setattr(corrupted, "VIEWS_IN_MEMORY_BYTES", {"cpu": split.images.numel()})  # one view's bytes
    first = GeneratedView(split, seed=7)
    fog, _ = first("fog", 2)
    later = GeneratedView(TensorSplit(split.images.clone(), split.labels.clone()), seed=7)  # an equal split
    assert later("fog", 2)[0] is fog and later.images == 0
    later("contrast", 2)  # over the budget with fog: fog goes
    assert list(views_in_memory) == [(later.key, "cpu", "contrast", 2)]
    assert torch.equal(later("fog", 2)[0], fog) and later.images == 20


def test_each_device_type_keeps_views_within_its_own_budget(views_in_memory, monkeypatch: pytest.MonkeyPatch):
    """Views on one device do not count against another's budget (CPU views once pushed GPU ones out)."""
    view = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    monkeypatch.setattr(corrupted, "VIEWS_IN_MEMORY_BYTES", {"cpu": view.numel(), "meta": 2 * view.numel()})
    corrupted._keep_in_memory(("split", "meta", "fog", 1), view.to("meta"))
    corrupted._keep_in_memory(("split", "cpu", "fog", 1), view)
    corrupted._keep_in_memory(("split", "meta", "fog", 2), view.to("meta"))
    assert list(views_in_memory) == [("split", "meta", "fog", 1), ("split", "cpu", "fog", 1),
                                     ("split", "meta", "fog", 2)]
    corrupted._keep_in_memory(("split", "cpu", "fog", 2), view)  # over the CPU budget: the CPU's oldest goes
    corrupted._keep_in_memory(("split", "meta", "fog", 3), view.to("meta"))  # and the meta device's
    assert list(views_in_memory) == [("split", "meta", "fog", 2), ("split", "cpu", "fog", 2),
                                     ("split", "meta", "fog", 3)]


def test_a_suite_run_after_another_takes_its_views_from_memory_with_the_same_rows(tmp_path, views_in_memory,
                                                                                  monkeypatch):
    """bn's run corrupts the views; gn's, next, finds them in memory. The rows equal those of runs that each
    corrupted their own views (memory off)."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "alone").mkdir()
    kept = run_rows(tmp_path / "kept", "memory")
    computed = {r["setting"]["normalizer"]: bool(r["extra"].get("corruption_images_per_s")) for r in kept}
    assert computed == {"bn": True, "gn": False}  # in the suite's order
    assert len(views_in_memory) == 4
    monkeypatch.setattr(corrupted, "VIEWS_IN_MEMORY_BYTES", {})
    views_in_memory.clear()
    alone = run_rows(tmp_path / "alone", "memory")
    assert all(r["extra"].get("corruption_images_per_s") for r in alone)
    def rows(records: list[dict]) -> dict:
        return {r["setting"]["normalizer"]: _measured_removed(r["rows"]) for r in records}

    assert rows(kept) == rows(alone)


def test_subset_view_keeps_the_same_rows_as_a_subset_split():
    split = TensorSplit(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.arange(20))
    images, labels = subset_view(lambda *_: (split.images, split.labels), 7)("fog", 1)
    assert torch.equal(images, split.subset(7).images) and torch.equal(labels, split.subset(7).labels)


def test_rows_cover_methods_corruptions_severities_and_batch_sizes(tmp_path, no_views_in_memory):
    records = run_rows(tmp_path, "tta-rows")  # each run corrupts its own views, and reports their throughput
    assert len(records) == 2  # one run per model: methods and batch sizes are rows, not runs
    for record in records:
        rows = record["rows"]
        cells = {(r["method"], r["corruption"], r["severity"], r["batch_size"]) for r in rows if "error" in r}
        evaluations = {("source", 4), ("source", 8), ("ptbn", 4), ("ptbn", 8), ("bn_adapt_N8", 4),
                       ("bn_adapt_N8", 8), ("tent", 8)}
        views = {("clean", 0), ("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)}
        assert cells == {(m, c, s, b) for m, b in evaluations for c, s in views}
        assert all(r["n"] == 24 for r in rows if "error" in r)
        summaries = [r for r in rows if r["corruption"] == "all"]
        assert {(r["method"], r["batch_size"]) for r in summaries} == evaluations
        assert all("mce" not in r and r["mean_error_s5"] >= 0 for r in summaries)  # no AlexNet errors for F-MNIST
        if record["setting"]["normalizer"] == "gn":  # nothing to adapt: every method predicts as source
            assert not any(r["adapted"] for r in rows)
            by_view = {}
            for r in rows:
                if "error" in r:
                    by_view.setdefault((r["corruption"], r["severity"]), set()).add(r["error"])
            assert all(len(errors) == 1 for errors in by_view.values())
        else:
            assert all(r["adapted"] == (r["method"] != "source") for r in rows)
        assert record["extra"]["corruption_images_per_s"] > 0


def test_records_name_the_protocol_and_rows_carry_calibration_and_cost(tmp_path):
    records = run_rows(tmp_path, "tta-continual", extra="  setting: continual\n  clean_after_images: 8")
    for record in records:
        assert {k: record["extra"][k] for k in ("setting", "images_per_view", "severity_order")} == {
            "setting": "continual", "images_per_view": 24, "severity_order": [1, 5]}
        assert "lower is better" in record["extra"]["metric_direction"]
        corrupted = [r for r in record["rows"] if r["corruption"] not in ("clean", "all")]
        assert all(r["setting"] == "continual" and 0 <= r["ece"] <= 100 and r["nll"] >= 0 and 0 <= r["brier"] <= 2
                   for r in corrupted)
        stateful = [r for r in corrupted if r["method"] == "tent"]
        assert all("clean_error_after" in r and r["backward_per_image"] == (1.0 if r["adapted"] else 0.0)
                   for r in stateful)
        summaries = [r for r in record["rows"] if r["corruption"] == "all"]
        assert all({"mean_ece", "mean_nll", "mean_brier", "ms_per_image"} <= set(r) for r in summaries)


def write_cifar10_c(root: Path, rows: int) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("gaussian_noise", "contrast"):
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * rows, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", rng.integers(0, 10, rows).astype(np.uint8))


def test_released_and_generated_views_give_the_same_table_schema(tmp_path):
    generated = run_rows(tmp_path, "tta-generated", dataset="cifar10")
    write_cifar10_c(tmp_path / "CIFAR-10-C", rows=40)
    released = run_rows(tmp_path, "tta-released", dataset="cifar10",
                        extra=f"  data: released\n  released_root: {tmp_path / 'CIFAR-10-C'}")

    def schema(records):
        return sorted({(tuple(sorted(r)), r["method"], r["corruption"], r["severity"], r["batch_size"], r.get("n"))
                       for record in records for r in record["rows"]}, key=str)

    assert schema(generated) == schema(released)  # the released view is cut to the test split's 24 images


def test_bad_task_options_are_one_line_user_errors(tmp_path):
    def edited(name: str, old: str, new: str) -> Path:  # edit in place: a repeated key is an error of its own
        path = write_suite(tmp_path, name)
        path.write_text(path.read_text().replace(old, new, 1))
        return path

    with pytest.raises(UserError, match=r"task_options.*unknown adaptation method 'norm'; allowed: .*ptbn"):
        load_suite(edited("bad1", "- name: source", "- name: norm"))
    with pytest.raises(UserError, match=r"unknown corruption 'fogg'"):
        load_suite(edited("bad2", "corruptions: [gaussian_noise, contrast]", "corruptions: [fogg]"))
    with pytest.raises(UserError, match=r"tent.*optimizer"):
        load_suite(edited("bad3", "optimizer: adam", "optimizer: lbfgs"))
    with pytest.raises(UserError, match="released_root"):
        load_suite(write_suite(tmp_path, "bad4", extra="  data: released"))


def test_released_data_needs_a_released_copy(tmp_path):
    path = write_suite(tmp_path / "suites", "fm-released", extra="  data: released\n  released_root: x")
    with pytest.raises(UserError, match=r"fashion_mnist.*allowed datasets: cifar10, cifar100, imagenet"):
        run_suite(path, "smoke", device="cpu", results_dir=tmp_path, progress=False, echo=lambda _: None)
