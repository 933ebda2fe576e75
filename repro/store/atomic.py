"""Files written so that no reader, and no process killed half-way, ever sees half of one; and damaged files set
aside instead of failing every later run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename it: a reader, or a process killed half-way,
    never leaves half a file. Readable by others (0644), like any file a tool writes for sharing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def move_aside(what: str, path: Path, problem: str, consequence: str) -> None:
    """Rename a damaged file to ``<name>.bad-<time>`` and say so on stderr, so that the next run does not fail on
    it again (checkpoints, training states)."""
    aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
    path.replace(aside)
    print(f"repro: warning: {what} {path} {problem}; moved to {aside.name}; {consequence}", file=sys.stderr)
