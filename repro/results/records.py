"""Run records: one JSON file per run at ``RESULTS/runs/<suite>/<run_id>.json``, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: statuses of a finished run; a ``failed`` record is retried on the next ``repro run``
COMPLETE_STATUSES = ("ok", "diverged")
RECORD_SCHEMA = 1


def record_path(results_dir: Path, suite: str, run_id: str) -> Path:
    return results_dir / "runs" / suite / f"{run_id}.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temporary file in the same folder and rename it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(payload, out, indent=1, sort_keys=False, default=str)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("status") in COMPLETE_STATUSES and record.get("schema") == RECORD_SCHEMA


def iter_records(results_dir: Path, suite: str | None = None) -> list[dict[str, Any]]:
    root = results_dir / "runs"
    folders = [root / suite] if suite else sorted(p for p in root.glob("*") if p.is_dir())
    records = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            record = read_record(path)
            if record is not None:
                records.append(record)
    return records
