"""``repro bundle`` brings what a GPU box with only PyTorch lacks: shown on a Python that cannot import the rest.

The box has torch, timm, numpy, pandas, matplotlib, pyyaml, tqdm and scipy (the lent H200 machine has them all;
the check's t-intervals need scipy). The test runs ``python -m repro`` with an
import hook that refuses every other third-party package repro might reach for unless it comes from the
bundle's wheels, installed offline into a folder of their own; git is hidden so that provenance must take the
commit from the bundle's ``source.json``.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repro.execute.bundle import BUNDLED_PACKAGES
from tests.conftest import TINY_SUITE

#: importable only from the bundle (or not at all: optional features must import them lazily)
NOT_ON_THE_BOX = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "tabulate", "datasets",
                  "huggingface_hub", "pyarrow", "imagecorruptions", "cv2", "skimage")
BOX_PYTHON = textwrap.dedent("""
    import importlib.machinery, runpy, sys
    site, blocked = sys.argv.pop(1), set(sys.argv.pop(1).split(","))

    class OnlyFromTheBundle:
        def find_spec(self, name, path=None, target=None):
            if path is not None or name.partition(".")[0] not in blocked:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, [site])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} on the GPU box", name=name)
            return spec

    sys.meta_path.insert(0, OnlyFromTheBundle())
    sys.argv[0] = "repro"
    runpy.run_module("repro", run_name="__main__", alter_sys=True)
""")


@pytest.mark.slow
def test_bundle_runs_a_suite_on_a_box_with_only_pytorch(tmp_path: Path, fashion_mnist) -> None:
    bundle, site, results = tmp_path / "bundle", tmp_path / "site", tmp_path / "results"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run([sys.executable, "-m", "repro", "bundle", str(bundle), "--python-version", python_version],
                          capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    wheels = sorted(bundle.glob("wheels/*.whl"))
    assert {w.name.split("-")[0].replace("_", "-").lower() for w in wheels} == set(BUNDLED_PACKAGES)
    assert sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) <= 48 * 2**20
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, wheels)], check=True)

    suites = tmp_path / "suites"
    suites.mkdir()
    text = TINY_SUITE.format(name="tiny-real").replace("generated: true", "generated: false")
    (suites / "tiny-real.yaml").write_text(textwrap.dedent(text))
    env = {"PATH": "/usr/bin:/bin", "REPRO_SUITES_DIR": str(suites), "GIT_DIR": str(tmp_path / "no-git"),
           "REPRO_SOURCE_FILE": str(bundle / "source.json"), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}

    def box(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", BOX_PYTHON, str(site), ",".join(NOT_ON_THE_BOX), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=tmp_path)

    for args in (["run", "tiny-real", "--tier", "smoke", "--no-progress", "--data-dir", str(bundle / "data")],
                 ["gather", "tiny-real"], ["check", "tiny-real"]):
        done = box(*args, "--results", str(results))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (results / "runs" / "tiny-real").glob("*.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    source = json.loads((bundle / "source.json").read_text())
    assert all(r["provenance"]["git_commit"] == source["git_commit"] is not None for r in records)
    assert all(r["provenance"]["source"] == "bundle" for r in records)
    assert (results / "checks" / "tiny-real.md").is_file()
