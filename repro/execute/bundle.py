"""``repro bundle OUT``: what a GPU box with only PyTorch needs to run repro offline.

* ``wheels/``: the packages repro imports beyond what such a box has (torch, timm, numpy, pandas, matplotlib,
  pyyaml, tqdm, scipy), for a stated Python and platform, fetched by ``pip download`` from the index this machine
  reaches. Install there with ``pip install --no-index --no-deps --target DIR wheels/*.whl``.
* ``data/``: the dataset files the named suites need (Fashion-MNIST's four IDX files), for ``--data-dir``.
* ``source.json``: the source commit (and whether the tree was dirty), which provenance records where the copy
  has no ``.git`` (``REPRO_SOURCE_FILE`` names it).

``OUT`` must be new or empty, and is written whole or not at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from repro.errors import UserError
from repro.store.atomic import atomic_folder
from repro.store.records import check_writable

#: repro's imports that a PyTorch box lacks, pinned through requirements.lock when it is there
BUNDLED_PACKAGES = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
                    "tabulate")
#: the datasets whose files are small enough to carry
BUNDLED_DATASETS = ("fashion_mnist",)
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
    """The files of each named dataset, from the folder its loader would read, checked first: a truncated copy
    stops the bundle here rather than the run on the box."""
    from repro.data.base import resolve_data_dir
    from repro.data.fashion_mnist import DEBIAN_DIR, FILES, find_idx_file, idx_folder, load_idx_dir, warn_partial_copy

    copied = []
    if "fashion_mnist" in names:
        data_dir = resolve_data_dir(data_dir)
        folder, partial = idx_folder(data_dir)
        if folder is None:
            looked = ", ".join(map(str, filter(None, (data_dir, DEBIAN_DIR))))
            raise UserError(f"repro bundle: Fashion-MNIST's four IDX files are not in {looked}"
                            f"{f' ({partial})' if partial else ''}; pass --data-dir")
        load_idx_dir(folder)
        warn_partial_copy(partial, str(folder))
        target.mkdir(parents=True, exist_ok=True)
        for stem in (s for pair in FILES.values() for s in pair):
            found = find_idx_file(folder, stem)
            copied.append(Path(shutil.copy2(found, target / found.name)))
    return copied


def check_out_folder(out: Path) -> None:
    """``out`` must be new or empty: a wheel already there would be listed in source.json and installed on the
    box with the bundle's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"repro bundle: {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"repro bundle: {out} is not empty; give a new or empty folder (what is there would go to "
                        "the box with the bundle)")
    check_writable(out.parent, "repro bundle OUT")


def write_bundle(out: Path, *, datasets: list[str], data_dir: Path | None, python_version: str,
                 platforms: list[str], repo: Path) -> dict[str, object]:
    """Build the bundle in a temporary folder beside ``out``, then rename it to ``out``: a failure (a download,
    a damaged data file, the size limit) leaves nothing behind."""
    unknown = [name for name in datasets if name not in BUNDLED_DATASETS]
    if unknown:
        raise UserError(f"--dataset {unknown[0]}: allowed: {', '.join(BUNDLED_DATASETS)} (the datasets whose files "
                        "are small enough to carry)")
    check_out_folder(out)
    with atomic_folder(out) as staging:
        return _fill(staging, datasets, data_dir, python_version, platforms, repo)


def _fill(folder: Path, datasets: list[str], data_dir: Path | None, python_version: str, platforms: list[str],
          repo: Path) -> dict[str, object]:
    wheels = download_wheels(folder / "wheels", python_version, platforms, repo / "requirements.lock")
    data = copy_data(datasets, folder / "data", data_dir)
    from repro.store.provenance import source_version

    commit = source_version()  # what provenance will record for this code, read the same way
    source = {"git_commit": commit["git_commit"], "git_dirty": commit["git_dirty"],
              "python": python_version, "platforms": platforms,
              "wheels": [w.name for w in wheels], "data": [d.name for d in data]}
    (folder / "source.json").write_text(json.dumps(source, indent=1) + "\n")
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    if size > MAX_BUNDLE_BYTES:
        raise UserError(f"repro bundle: the bundle is {size / 2**20:.1f} MiB, over the 48 MiB a window can carry")
    source["bytes"] = size
    return source
