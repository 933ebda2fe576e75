"""Run records: one JSON file per run at ``RESULTS/runs/<suite>/<run_id>.json``, written atomically; reading them
back (a malformed record is reported and treated as missing); and the lock a run holds while it runs.

What a record's numbers mean (collapsed at chance, best top-1 before divergence) is ``repro.results.chance``'s."""

from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.errors import UserError

#: statuses of a finished run; a ``failed`` record is retried on the next ``repro run``
COMPLETE_STATUSES = ("ok", "diverged")
RECORD_SCHEMA = 1


def record_path(results_dir: Path, suite: str, run_id: str) -> Path:
    return results_dir / "runs" / suite / f"{run_id}.json"


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
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: a lock file that cannot be parsed is being written (or its writer died first): stale after this long
UNREADABLE_LOCK_S = 60


def lock_path(record: Path) -> Path:
    return record.with_suffix(".lock")


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run's lock: host and PID, and where /proc tells them, the process's start time (clock ticks
    since boot) and the boot's id. A PID alone names another process once it is reused, as after a reboot."""

    pid: int
    host: str
    start_ticks: int | None = None
    boot_id: str | None = None

    def line(self) -> str:
        """The lock file's one line: ``PID HOST START BOOT`` (``-`` for what is unknown); older repro wrote the
        first two fields only."""
        return f"{self.pid} {self.host} {'-' if self.start_ticks is None else self.start_ticks} {self.boot_id or '-'}"


def _process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat, counted after the
    command name, which may hold spaces); None when no such process runs, or there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[19])


def _this_boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def _this_process() -> LockOwner:
    return LockOwner(os.getpid(), socket.gethostname(), _process_start_ticks(os.getpid()), _this_boot_id())


def _read_owner(lock: Path) -> LockOwner | None:
    """The owner a regular lock file names, or None when it names none (being written, or damaged). Opened
    without blocking and read no further than its line."""
    try:
        handle = os.open(lock, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(handle, "rb") as lock_file:
            pid_text, host, *rest = lock_file.read(512).decode().split()
        pid = int(pid_text)
        start = int(rest[0]) if rest and rest[0] != "-" else None
        boot = rest[1] if len(rest) > 1 and rest[1] != "-" else None
    except (OSError, ValueError):  # ValueError: too few fields, not a number, not UTF-8
        return None
    return LockOwner(pid, host, start, boot) if pid > 0 else None


def _why_stale(owner: LockOwner, lock: Path) -> str | None:
    """None when the lock's owner, a process of this host, still runs: its PID in this boot, started when the
    lock says (a lock without a start time, from an older repro, is judged by its PID alone); else why not."""
    if owner.pid == os.getpid():
        return None if lock in _held_locks else "left by this very process"
    booted = _this_boot_id()
    if owner.boot_id and booted and owner.boot_id != booted:
        return f"process {owner.pid} ran before this host's last boot"
    start = _process_start_ticks(owner.pid)
    if start is not None:
        return None if owner.start_ticks in (None, start) else f"PID {owner.pid} now names a process started later"
    try:  # no /proc, or one that hides other users' processes: the PID is all there is to check
        os.kill(owner.pid, 0)
    except (ProcessLookupError, OverflowError):
        return f"process {owner.pid} no longer runs"
    except PermissionError:
        return None
    return None


def _lock_holder(lock: Path) -> str | None:
    """Why the run of an existing lock file may not run here, in one line naming the file and how to remove it;
    None when the lock is stale (its process no longer runs on this host), after a note on stderr."""
    remove = f"if no repro process runs it, remove the lock: rm {shlex.quote(str(lock))}"
    try:
        info = os.lstat(lock)
    except FileNotFoundError:
        return None  # released meanwhile
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block a read, a folder cannot be unlinked
        return f"{lock}: the run's lock is not a regular file; remove it: rm -r {shlex.quote(str(lock))}"
    owner = _read_owner(lock)
    if owner is None:
        if time.time() - info.st_mtime < UNREADABLE_LOCK_S:
            return f"{lock}: being written by another process; {remove}"
        why = f"unreadable and older than {UNREADABLE_LOCK_S} s"
    elif owner.host != socket.gethostname():
        return f"{lock}: held by process {owner.pid} on host {owner.host}, which this host cannot check; {remove}"
    else:
        why = _why_stale(owner, lock)
        if why is None:
            return f"{lock}: held by process {owner.pid}, running on this host; {remove}"
    print(f"repro: note: {lock}: stale lock ({why}); taken over", file=sys.stderr)
    return None


def claim_run(record: Path) -> str | None:
    """Take the run's lock, an O_EXCL file next to its record naming this process (``LockOwner``), so that two
    ``repro run`` on one results folder never run the same run twice.

    None when this process now holds it; else why the run may not run here, one line that names the lock file
    and how to remove it. A lock whose process no longer runs on this host is taken over; one of another host
    never is, since this host cannot tell whether its process runs."""
    lock = lock_path(record)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                return holder
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as out:
            out.write(_this_process().line() + "\n")
        _held_locks.add(lock)
        return None
    return f"{lock}: taken by another process meanwhile; if no repro process runs it, remove the lock"


def release_run(record: Path) -> None:
    lock = lock_path(record)
    if lock in _held_locks:
        _held_locks.discard(lock)
        lock.unlink(missing_ok=True)
