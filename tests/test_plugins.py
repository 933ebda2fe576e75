"""Plugins: a package outside repro adds a normalizer and a method through entry points, the battery runs them, and
bad plugins stop a command with one line and exit 2 before anything is written.

Every test runs repro in a subprocess: a plugin registers into the process's registries, which the other tests
share.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "repro-plugin-example"
#: a suite over a built-in normalizer and a plugin's (``plain_copy``), on generated images
PLUGIN_SUITE = """
name: uses-plugin
version: 1
description: a suite that names a plugin's normalizer
citation: none
plugins: []
dataset: {name: fashion_mnist, train_subset: 64, test_subset: 64, generated: true}
backbones: [test_resnet]
normalizers: [bn, plain_copy]
seeds: [0]
train: {epochs: 1, batch_size: 32, lr: 0.05}
tiers:
  full: {}
  smoke: {}
"""


def _python(*args: str, site: Path | None = None, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(str(p) for p in (ROOT, site) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=900,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **env})


def _repro(*args: str, site: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return _python("-m", "repro", *args, site=site, **env)


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed (offline, no dependencies) into a folder that goes on the path."""
    build = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, build / "source", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = build / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                "--no-build-isolation", "--target", str(site), str(source)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    return site


def _fake_distribution(site: Path, name: str, version: str, module: str, code: str,
                       entry_points: dict[str, dict[str, str]]) -> None:
    """An installed distribution as importlib.metadata reads it: a module and a dist-info folder."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "RECORD").write_text(f"{module}.py,,\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
        for group, points in entry_points.items()))


def test_installed_plugin_is_listed_with_its_source(example_site: Path) -> None:
    listed = _repro("list", "--normalizers", "--methods", site=example_site)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert any(line.split()[:3] == ["channel_rms", "repro-plugin-example", "0.1.0"] for line in lines)
    assert any(line.split()[:3] == ["flip_average", "repro-plugin-example", "0.1.0"] for line in lines)
    assert any(line.split() == ["evonorm_b0", "repro"] for line in lines)


@pytest.mark.slow
def test_battery_runs_the_example_and_ranks_it(example_site: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    battery = _repro("battery", "channel_rms", "--tier", "smoke", "--results", str(results), "--no-progress",
                     site=example_site)
    assert battery.returncode == 0, battery.stdout + battery.stderr
    board = (results / "tables" / "battery-channel_rms.smoke.md").read_text()
    rows = [line.split("|")[1].strip() for line in board.splitlines() if line.startswith("|")][2:]
    assert rows == ["channel_rms", "bn", "gn"]
    assert "not run" not in board
    assert board in battery.stdout
    for part in ("lr", "microbatch", "corruptions"):
        assert (results / "tables" / f"battery-channel_rms-{part}.md").is_file()
    assert "ptbn-beats-source" in (results / "checks" / "battery-channel_rms-corruptions.md").read_text()
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("battery-channel_rms-*/*.json")]
    by_normalizer = {r["setting"]["normalizer"]: r for r in records}
    plugin = {"repro-plugin-example": "0.1.0"}
    assert by_normalizer["channel_rms"]["config"]["plugins"] == plugin
    assert by_normalizer["channel_rms"]["provenance"]["plugins"] == plugin
    assert "plugins" not in by_normalizer["bn"]["config"] and "plugins" not in by_normalizer["bn"]["provenance"]

    method = _repro("battery", "flip_average", "--method", "--tier", "smoke", "--results", str(results),
                    "--no-progress", site=example_site)
    assert method.returncode == 0, method.stdout + method.stderr
    board = (results / "tables" / "battery-flip_average.smoke.md").read_text()
    rows = [line.split("|")[1].strip() for line in board.splitlines() if line.startswith("|")][2:]
    assert rows == ["source", "ptbn", "tent", "flip_average"]
    assert "C-error on bn" in board and "C-error on gn" in board and "not run" not in board


def test_run_ids_carry_a_plugin_version_only_where_its_thing_runs(tmp_path: Path) -> None:
    """A new version of a plugin gives its runs new ids; the built-in normalizer's runs keep theirs."""
    code = """
        from repro.norms import register_normalizer
        from repro.norms.identity import NoNorm

        @register_normalizer("plain_copy")
        class PlainCopy(NoNorm):
            pass
    """
    suite = tmp_path / "suites" / "uses-plugin.yaml"
    suite.parent.mkdir()
    suite.write_text(PLUGIN_SUITE)
    ids = {}
    for version in ("1.0", "2.0"):
        site = tmp_path / version
        _fake_distribution(site, "plain-copy", version, "plain_copy", code, {"repro.normalizers": {
            "plain_copy": "plain_copy"}})
        printed = _python("-c", "import json; from repro.suite import expand, load_suite; "
                          "suite, _ = load_suite('uses-plugin'); "
                          "print(json.dumps({r.setting['normalizer']: r.run_id for r in expand(suite, 'smoke')}))",
                          site=site, REPRO_SUITES_DIR=str(suite.parent))
        assert printed.returncode == 0, printed.stderr
        ids[version] = json.loads(printed.stdout)
    assert ids["1.0"]["bn"] == ids["2.0"]["bn"]
    assert ids["1.0"]["plain_copy"] != ids["2.0"]["plain_copy"]


BROKEN = "raise RuntimeError('the lab forgot a dependency')\n"
DUPLICATE = """
    from repro.norms import register_normalizer
    from repro.norms.identity import NoNorm

    @register_normalizer("bn")
    class NotBatchNorm(NoNorm):
        pass
"""


@pytest.mark.parametrize(("code", "message"), [
    (BROKEN, "plugin lab_plugin failed to import: RuntimeError: the lab forgot a dependency"),
    (DUPLICATE, "plugin lab_plugin registers normalizer 'bn', which repro already has"),
], ids=["import-error", "duplicate-name"])
def test_bad_plugin_module_stops_before_anything_is_written(code: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "lab_plugin.py").write_text(textwrap.dedent(code))
    results = tmp_path / "results"
    outcome = _repro("run", "fmnist-normalizers", "--plugin", "lab_plugin", "--results", str(results),
                     site=tmp_path)
    assert outcome.returncode == 2
    assert outcome.stderr.splitlines() == [f"repro: error: {message}"]
    assert not results.exists()


def test_missing_plugin_module_is_one_line(tmp_path: Path) -> None:
    outcome = _repro("battery", "bn", "--plugin", "no_such_lab_plugin", "--results", str(tmp_path / "results"))
    assert outcome.returncode == 2
    assert outcome.stderr.splitlines() == [
        "repro: error: plugin no_such_lab_plugin failed to import: no module named 'no_such_lab_plugin'"]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("registered", "entry_point", "message"), [
    ("gn", "gn", "plugin lab_norms (distribution lab-norms) registers normalizer 'gn', which repro already has"),
    ("lab_norm", "other_name", "plugin lab-norms: entry point 'other_name' in group repro.normalizers names module "
     "lab_norms, which registers no normalizer 'other_name'"),
], ids=["duplicate-name", "entry-point-name-not-registered"])
def test_bad_entry_point_plugin_is_named_by_its_distribution(registered: str, entry_point: str, message: str,
                                                             tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "lab-norms", "0.3", "lab_norms", DUPLICATE.replace('"bn"', f'"{registered}"'),
                       {"repro.normalizers": {entry_point: "lab_norms"}})
    outcome = _repro("list", "--normalizers", site=tmp_path)
    assert outcome.returncode == 2
    assert outcome.stderr.splitlines() == [f"repro: error: {message}"]


def test_suite_plugins_field_imports_its_modules(tmp_path: Path) -> None:
    (tmp_path / "lab_plugin.py").write_text(BROKEN)
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "uses-plugin.yaml").write_text(PLUGIN_SUITE.replace("plugins: []", "plugins: [lab_plugin]"))
    outcome = _repro("run", "uses-plugin", "--results", str(tmp_path / "results"), site=tmp_path,
                     REPRO_SUITES_DIR=str(suites))
    assert outcome.returncode == 2
    assert outcome.stderr.splitlines() == [
        f"repro: error: {suites / 'uses-plugin.yaml'}: field plugins: plugin lab_plugin failed to import: "
        "RuntimeError: the lab forgot a dependency"]
    assert not (tmp_path / "results").exists()
