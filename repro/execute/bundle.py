"""``repro bundle OUT``: what a GPU box with only PyTorch needs to run repro offline.

* ``wheels/``: the packages repro imports beyond what such a box has (torch, timm, numpy, pandas, matplotlib,
  pyyaml, tqdm, scipy), for a stated Python and platform, fetched by ``pip download`` from the index this machine
  reaches. Install there with ``pip install --no-index --no-deps --target DIR wheels/*.whl``.
* ``data/``: the dataset files the named suites need (Fashion-MNIST's four IDX files), for ``--data-dir``.
* ``source.json``: the source commit (and whether the tree was dirty), which provenance records where the copy
  has no ``.git`` (``REPRO_SOURCE_FILE`` names it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from repro.errors import UserError

#: repro's imports that a PyTorch box lacks, pinned through requirements.lock when it is there
BUNDLED_PACKAGES = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
                    "tabulate")
MAX_BUNDLE_BYTES = 48 * 2**20


def locked_versions(lock: Path) -> dict[str, str]:
    versions = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            name, sep, version = line.partition("==")
            if sep:
                versions[name.strip().lower()] = version.split(";")[0].strip()
    return versions


def download_wheels(target: Path, python_version: str, platforms: list[str], lock: Path) -> list[Path]:
    versions = locked_versions(lock)
    requirements = [f"{name}=={versions[name]}" if name in versions else name for name in BUNDLED_PACKAGES]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", str(target), *requirements]
    for platform in platforms:
        command += ["--platform", platform]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"repro bundle: pip download failed for {', '.join(requirements)}: {last}")
    return sorted(target.glob("*.whl"))


def copy_data(names: list[str], target: Path, data_dir: Path | None) -> list[Path]:
    """The local files of each named dataset (only Fashion-MNIST ships as files small enough to carry)."""
    from repro.data.base import resolve_data_dir
    from repro.data.fashion_mnist import DEBIAN_DIR, FILES, find_idx_file

    copied = []
    if "fashion_mnist" in names:
        data_dir = resolve_data_dir(data_dir)
        sources = ([data_dir] if data_dir else []) + [DEBIAN_DIR]
        for stem in (s for pair in FILES.values() for s in pair):
            found = next((f for d in sources if (f := find_idx_file(d, stem))), None)
            if found is None:
                raise UserError(f"repro bundle: Fashion-MNIST file {stem} not found in "
                                f"{', '.join(map(str, sources))}; pass --data-dir")
            target.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copy2(found, target / found.name)))
    return copied


def write_bundle(out: Path, *, datasets: list[str], data_dir: Path | None, python_version: str,
                 platforms: list[str], repo: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    wheels = download_wheels(out / "wheels", python_version, platforms, repo / "requirements.lock")
    data = copy_data(datasets, out / "data", data_dir)
    from repro.results.provenance import source_version

    commit = source_version()  # what provenance will record for this code, read the same way
    source = {"git_commit": commit["git_commit"], "git_dirty": commit["git_dirty"],
              "python": python_version, "platforms": platforms,
              "wheels": [w.name for w in wheels], "data": [d.name for d in data]}
    (out / "source.json").write_text(json.dumps(source, indent=1) + "\n")
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    if size > MAX_BUNDLE_BYTES:
        raise UserError(f"repro bundle: {out} is {size / 2**20:.1f} MiB, over the 48 MiB a window can carry")
    source["bytes"] = size
    return source
