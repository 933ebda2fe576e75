"""Shared test setup: no network, one thread per process, generated data in a temporary cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# subprocesses (workers, cluster-job stand-ins, the bundle's box) compute with one thread like this process, so
# that their records can equal in-process ones bit for bit (a float sum's order depends on the thread count)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _generated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["REPRO_CACHE_DIR"] = str(tmp_path_factory.mktemp("repro-cache"))


TINY_SUITE = """
name: {name}
version: 1
description: a tiny suite for tests
citation: none
dataset: {{name: fashion_mnist, train_subset: 192, test_subset: 64, generated: true}}
backbones: [test_resnet]
normalizers: [bn, {{name: gn, options: {{group_size: 8}}}}]
model: {{small_input: true}}
seeds: [0]
train: {{epochs: 1, batch_size: 32, lr: 0.05, eval_batch_size: 64}}
tiers:
  full: {{}}
  smoke: {{}}
references:
  - kind: relative
    id: gn-vs-bn
    claim: test claim
    metric: top1
    a: {{normalizer: gn}}
    b: {{normalizer: bn}}
    min: -50
    source: test
    tiers: [smoke]
"""


#: what a run measures about the machine (time, memory) rather than computes; the rest must be identical
_MEASURED = re.compile(r"(_s|_ms|images_per_s|peak_memory_mb)$")


def computed_fields(record: dict) -> dict:
    """The parts of a record that must not depend on where or alongside what the run ran."""
    def strip(values: dict) -> dict:
        return {k: v for k, v in values.items() if not _MEASURED.search(k)}

    return {"run_id": record["run_id"], "status": record["status"], "config": record["config"],
            "setting": record["setting"], "metrics": strip(record["metrics"]),
            "curve": [strip(point) for point in record["curve"]], "rows": record["rows"],
            "suite_version": record["suite_version"], "tier": record["tier"]}


@pytest.fixture(autouse=True)
def fresh_views_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the corrupted views earlier tests left in memory (``repro.data.corrupted``)."""
    from collections import OrderedDict

    from repro.data import corrupted

    monkeypatch.setattr(corrupted, "_views_in_memory", OrderedDict())


@pytest.fixture
def suites_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A suites/ folder holding ``tiny.yaml``; REPRO_SUITES_DIR points at it."""
    directory = tmp_path / "suites"
    directory.mkdir()
    (directory / "tiny.yaml").write_text(textwrap.dedent(TINY_SUITE.format(name="tiny")))
    monkeypatch.setenv("REPRO_SUITES_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def fashion_mnist():
    """The real Fashion-MNIST from a local copy (REPRO_DATA_DIR) or Debian's package; never the hub."""
    from repro.data import load_dataset
    from repro.errors import UserError

    errors = []
    for source in ("local", "debian"):
        try:
            return load_dataset("fashion_mnist", source=source)
        except UserError as err:
            errors.append(str(err))
    pytest.skip(f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): {errors[-1]}")


#: two small suites for the results site: claims that pass, fail and are not run, an absolute reference, a plot
REPORT_SUITE = """
name: {name}
version: 1
description: a small suite for the results site's tests
citation: Somebody 2020, A Paper (arXiv:0000.00000)
dataset: {{name: fashion_mnist, train_subset: 64, test_subset: 64, generated: true}}
backbones: [test_resnet]
normalizers: [bn, gn]
model: {{small_input: true}}
seeds: [0, 1, 2]
train: {{epochs: 1, batch_size: 32, lr: 0.05}}
tiers:
  full: {{}}
  smoke: {{}}
references:
  - {{kind: relative, id: gn-close-to-bn, claim: gn within 50 points of bn, metric: top1, a: {{normalizer: gn}},
     b: {{normalizer: bn}}, min: -50, source: test, tiers: [smoke, full]}}
  - {{kind: relative, id: gn-far-above-bn, claim: gn 30 points above bn, metric: top1, a: {{normalizer: gn}},
     b: {{normalizer: bn}}, min: 30, source: test, tiers: [smoke]}}
  - {{kind: absolute, id: bn-top1, metric: top1, value: 80, tolerance: 5, setting: {{normalizer: bn}}, source: a table,
     confidence: P, tolerance_from: measurement, note: "records written by the test", tiers: [smoke]}}
plots:
  - {{name: top1-per-seed, x: seed, y: top1, line: normalizer}}
"""
#: top-1 of the records the site's tests write, per normalizer and seed
REPORT_TOP1 = {("bn", 0): 80.0, ("bn", 1): 81.0, ("bn", 2): 79.0, ("gn", 0): 78.0, ("gn", 1): 79.0, ("gn", 2): 80.0}
REPORT_SUITES = ("report-one", "report-two")


def write_report_results(results: Path, suites: Path) -> Path:
    """The smoke tier of ``REPORT_SUITES`` as records in ``results``, their suite files in ``suites``."""
    from repro.store.atomic import write_json_atomic
    from repro.store.records import RECORD_SCHEMA, record_path
    from repro.suite.expand import expand
    from repro.suite.load import load_suite

    suites.mkdir(parents=True, exist_ok=True)
    for name in REPORT_SUITES:
        path = suites / f"{name}.yaml"
        path.write_text(REPORT_SUITE.format(name=name))
        suite, _ = load_suite(path)
        for run in expand(suite, "smoke"):
            top1 = REPORT_TOP1[run.setting["normalizer"], run.setting["seed"]]
            write_json_atomic(record_path(results, name, run.run_id), {
                "schema": RECORD_SCHEMA, "suite": name, "suite_version": 1, "run_id": run.run_id, "status": "ok",
                "tier": "smoke", "setting": run.setting, "config": {"train": {"amp_cpu": False}},
                "metrics": {"top1": top1, "loss": 0.5}, "rows": [],
                "started_at": "2026-12-01T10:00:00+00:00", "finished_at": "2026-12-01T10:05:00+00:00",
                "provenance": {"device": "cpu", "device_name": "Test CPU", "cpu_threads": 1, "torch": "2.15.0",
                               "python": "3.11.7", "git_commit": "0123456789abcdef", "packages": {"timm": "1.0.31"}}})
    return results


@pytest.fixture(scope="module")
def report_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A results folder of ``REPORT_SUITES`` (smoke tier, three seeds); REPRO_SUITES_DIR points at their files."""
    folder = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REPRO_SUITES_DIR", str(folder / "suites"))
        yield write_report_results(folder / "results", folder / "suites")
