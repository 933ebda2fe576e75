"""Where a number came from: code version, packages, hardware, data and suite file hashes."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("repro", "torch", "torchvision", "timm", "numpy", "pandas", "datasets", "pydantic", "pyyaml")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_version() -> dict[str, Any]:
    """The commit this code came from: the ``source.json`` of the bundle that brought it when
    ``REPRO_SOURCE_FILE`` names one (a copied tree may carry no ``.git``, or a stale one), else git.

    Read afresh at every call: a commit or an edit can happen while a process lives (a worker of ``repro run
    --workers`` runs for hours), so the runner reads it when a run starts and again when its record is written."""
    if os.environ.get("REPRO_SOURCE_FILE"):
        source = json.loads(Path(os.environ["REPRO_SOURCE_FILE"]).read_text())
        return {"git_commit": source.get("git_commit"), "git_dirty": source.get("git_dirty"),
                "source": "bundle"}
    commit = _git("rev-parse", "HEAD")
    # results/ is what runs write, so changes there do not make the code that produced a record "dirty"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None, "source": "git"}


@functools.cache
def environment() -> dict[str, Any]:
    """The parts of provenance shared by every run of one process (the source's version is not: see
    ``source_version``)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": package_versions(),
    }


def provenance(device: torch.device, data_fingerprint: str | None, data_source: str | None,
               code: dict[str, Any], plugins: dict[str, str] | None = None) -> dict[str, Any]:
    """A record's provenance; ``code`` is the source's version and the suite file's hash when the run started;
    ``plugins`` the ``{distribution: version}`` of the plugins the run uses (none: no key, as before plugins)."""
    return {
        **({"plugins": plugins} if plugins else {}),
        **code,
        **environment(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "data_fingerprint": data_fingerprint,
        "data_source": data_source,
    }
