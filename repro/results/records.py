"""Run records: one JSON file per run at ``RESULTS/runs/<suite>/<run_id>.json``, written atomically."""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from repro.data import DATASETS
from repro.errors import UserError

#: statuses of a finished run; a ``failed`` record is retried on the next ``repro run``
COMPLETE_STATUSES = ("ok", "diverged")
RECORD_SCHEMA = 1


#: how close to chance a finished run must end to count as collapsed (see ``is_collapsed``)
CHANCE_TOP1_FACTOR = 1.5
CHANCE_LOSS_RELATIVE = 0.02


def is_collapsed(record: dict[str, Any]) -> bool:
    """Whether a run finished (``ok``) at chance: top-1 at most 1.5x chance and a test loss within 2% of ln(C),
    the loss of a uniform prediction.

    Such a network stopped learning (a constant output) without a non-finite loss, so it is not ``diverged``; a
    claim must say how it counts (``collapsed_as``). Chance is that of the registered dataset's classes, so a
    generated stand-in with fewer classes (the ImageNet smoke tier's 4) is never flagged.
    """
    metrics = record.get("metrics") or {}
    top1, loss = metrics.get("top1"), metrics.get("loss")
    dataset = ((record.get("config") or {}).get("dataset") or {}).get("name")
    if record.get("status") != "ok" or dataset not in DATASETS or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (top1, loss)):
        return False
    classes = DATASETS.get(dataset).num_classes
    chance_loss = math.log(classes)
    return top1 <= CHANCE_TOP1_FACTOR * 100 / classes and abs(loss - chance_loss) <= CHANCE_LOSS_RELATIVE * chance_loss


def best_top1_before_divergence(record: dict[str, Any]) -> float | None:
    """A diverged run's best test top-1 before it diverged: what a paper reports for it when its measure is the
    best accuracy reached (MimicNorm's Table 2). None for a run that did not diverge.

    Only epochs evaluated at a finite test loss count: the evaluation that found a NaN loss scores the argmax of
    NaN logits, not an accuracy. A run that diverged before its first such evaluation scores chance (100 / the
    registered dataset's classes), what its untrained network scores and what the paper reports for such runs;
    None when the dataset is not registered.
    """
    if record.get("status") != "diverged":
        return None
    reached = [point["test_top1"] for point in record.get("curve") or []
               if isinstance(point.get("test_loss"), int | float) and math.isfinite(point["test_loss"])
               and isinstance(point.get("test_top1"), int | float)]
    if reached:
        return float(max(reached))
    dataset = ((record.get("config") or {}).get("dataset") or {}).get("name")
    return 100 / DATASETS.get(dataset).num_classes if dataset in DATASETS else None


def record_path(results_dir: Path, suite: str, run_id: str) -> Path:
    return results_dir / "runs" / suite / f"{run_id}.json"


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


#: fields every record has, and their types: a record without them is reported and treated as missing
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": int, "suite": str, "suite_version": int, "run_id": str, "status": str, "tier": str, "setting": dict,
    "config": dict, "metrics": dict,
}


def record_problem(record: Any) -> str | None:
    """Why a parsed record cannot be used (a missing or mistyped field), or None when it can."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kind in RECORD_FIELDS.items():
        if name not in record:
            return f"field {name} is missing"
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return f"field {name} is not a {kind.__name__}"
    if not isinstance(record.get("rows", []), list) or not all(isinstance(r, dict) for r in record.get("rows", [])):
        return "field rows is not a list of objects"
    return None


def move_aside(what: str, path: Path, problem: str, consequence: str) -> None:
    """Rename a damaged file to ``<name>.bad-<time>`` and say so on stderr, so that the next run does not fail on
    it again (checkpoints, training states)."""
    aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
    path.replace(aside)
    print(f"repro: warning: {what} {path} {problem}; moved to {aside.name}; {consequence}", file=sys.stderr)


def warn_malformed(path: Path, problem: str) -> None:
    print(f"repro: warning: {path}: malformed record ({problem}); treated as missing", file=sys.stderr)


def read_record(path: Path, *, warn: bool = True) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing, unreadable or malformed (reported by path)."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        if warn:
            warn_malformed(path, f"not JSON: {type(err).__name__}")
        return None
    problem = record_problem(record)
    if problem is not None:
        if warn:
            warn_malformed(path, problem)
        return None
    return record


def is_complete(record: dict[str, Any] | None) -> bool:
    """A finished record of this schema (``read_record`` has already set malformed ones aside as None)."""
    return bool(record) and record.get("status") in COMPLETE_STATUSES and record.get("schema") == RECORD_SCHEMA


def is_current(record: dict[str, Any] | None, shared_with: str | None) -> bool:
    """Complete, and computed as the expansion now asks: a copy of another run's numbers (``shared_from``) no
    longer stands for a run that must execute itself (a tier's ``unshared_seeds``)."""
    return is_complete(record) and not (record.get("shared_from") and not shared_with)


def iter_records(results_dir: Path, suite: str | None = None, *, warn: bool = True) -> list[dict[str, Any]]:
    root = results_dir / "runs"
    folders = [root / suite] if suite else sorted(p for p in root.glob("*") if p.is_dir())
    records = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            record = read_record(path, warn=warn)
            if record is not None:
                records.append(record)
    return records


def check_writable(folder: Path, flag: str) -> None:
    """Fail before any training when records could not be written there (a mistyped or read-only folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag}: cannot write to {folder} ({err.strerror or err})") from None


#: lock files this process holds, removed at exit whatever happens (Ctrl-C included)
_held_locks: set[Path] = set()
atexit.register(lambda: [lock.unlink(missing_ok=True) for lock in list(_held_locks)])


def lock_path(record: Path) -> Path:
    return record.with_suffix(".lock")


def _holder_alive(lock: Path) -> bool:
    """Whether the process named in a lock file still runs; a lock of a dead process (kill -9) is stale."""
    try:
        pid_text, _, host = lock.read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):  # being written right now, or its writer died before writing: stale after a minute
        try:
            return time.time() - lock.stat().st_mtime < 60
        except OSError:
            return False
    if host.strip() != socket.gethostname():
        return True  # another machine on a shared folder: cannot tell, so assume it runs
    if pid == os.getpid():
        return lock in _held_locks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run(record: Path) -> bool:
    """Take the run's lock (an O_EXCL file next to its record); False when a live process holds it, so two
    ``repro run`` on one results folder never train the same run twice."""
    lock = lock_path(record)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _holder_alive(lock):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w") as out:
            out.write(f"{os.getpid()} {socket.gethostname()}\n")
        _held_locks.add(lock)
        return True
    return False


def release_run(record: Path) -> None:
    lock = lock_path(record)
    if lock in _held_locks:
        _held_locks.discard(lock)
        lock.unlink(missing_ok=True)
