"""Files written so that no reader, and no process killed half-way, ever sees half of one; and damaged files set
aside instead of failing every later run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder for any writer that takes a path (``torch.save``, ``np.save`` on an
    open file, ``savefig``): on success it is synced and renamed into place, on an error removed, so a reader, or
    a process killed half-way, never sees half a file. Its name holds the process id and is unique (``mkstemp``):
    concurrent writers never share one. Readable by others (0644), like any file a tool writes for sharing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill: on success it takes ``path``'s place (a folder already there is
    moved aside and then removed), on an error it is removed, so ``path`` holds the old folder or the whole new
    one, never half of it. Readable by others (0755), like any folder a tool writes for sharing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        staging.chmod(0o755)
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent)) / path.name
        if path.exists():
            path.rename(old)
        staging.rename(path)
        shutil.rmtree(old.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as out:
        out.write(text)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def move_aside(what: str, path: Path, problem: str, consequence: str) -> None:
    """Rename a damaged file to ``<name>.bad-<time>`` and say so on stderr, so that the next run does not fail on
    it again (checkpoints, training states)."""
    aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
    path.replace(aside)
    print(f"repro: warning: {what} {path} {problem}; moved to {aside.name}; {consequence}", file=sys.stderr)
