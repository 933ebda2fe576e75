"""One archive of a campaign's results (``pack``), and merging one into a results folder (``repro unpack``).

The archive holds the records of the campaign's suites, their tables, plots and checks, and the campaign log,
as a ``.tar.gz`` of at most 16 MiB (what a GPU window can send back in one file). It is written to a temporary
name and renamed, so a window cut short returns the last complete archive, never half of one.

Unpacking trusts nothing in the archive: members must be plain files under ``runs/<suite>/``, a record's run id
must be the hash of its own configuration (and its file name), and a record never replaces a complete one.
Tables and checks are not copied: they describe the archive's folder, not the merged one, so ``repro gather``
and ``repro check`` rebuild them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from repro.errors import UserError
from repro.results.records import is_complete, read_record, record_problem, write_json_atomic

MAX_ARCHIVE_BYTES = 16 * 2**20
RECORD_MEMBER_PARTS = 3  # runs/<suite>/<run_id>.json


def _campaign_files(results_dir: Path, suites: list[str]) -> list[Path]:
    files = []
    for suite in suites:
        files += sorted((results_dir / "runs" / suite).glob("*.json"))
        files += sorted((results_dir / "tables").glob(f"{suite}.*"))
        files += sorted((results_dir / "tables").glob(f"{suite}-*.png"))
        files += sorted((results_dir / "checks").glob(f"{suite}.md"))
    return [path for path in files if path.is_file()]


def pack(results_dir: Path, suites: list[str], archive: Path, log: Path | None = None) -> int:
    """Write the archive atomically; plots are left out first if it would exceed 16 MiB. Returns its size."""
    files = _campaign_files(results_dir, suites)
    if log is not None and log.is_file():
        files.append(log)
    for keep_plots in (True, False):
        chosen = [path for path in files if keep_plots or path.suffix != ".png"]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in chosen:
                tar.add(path, arcname=path.relative_to(results_dir).as_posix(), recursive=False)
        if buffer.tell() <= MAX_ARCHIVE_BYTES:
            break
    else:
        raise RuntimeError(f"{archive}: the records alone take {buffer.tell() / 2**20:.1f} MiB, over 16 MiB")
    archive.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    with os.fdopen(handle, "wb") as out:
        out.write(buffer.getvalue())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the archive from the people it is for
    os.replace(tmp, archive)
    return buffer.tell()


@dataclass
class UnpackSummary:
    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


def _record_problem(member: tarfile.TarInfo, record: dict | None) -> str | None:
    """Why a record member may not be merged, or None."""
    from repro.suite.expand import run_id_of

    suite, run_file = Path(member.name).parts[1:]
    if record is None:
        return "not a JSON record"
    problem = record_problem(record)  # the fields every reader of a record needs
    if problem is not None:
        return problem
    config = record["config"]
    if record.get("run_id") != run_id_of(config) or run_file != f"{record.get('run_id')}.json":
        return f"run id {record.get('run_id')!r} is not the hash of its configuration ({run_id_of(config)})"
    if record.get("suite") != suite:
        return f"suite {record.get('suite')!r} is not its folder {suite!r}"
    return None


def unpack(archive: Path, results_dir: Path) -> UnpackSummary:
    """Merge the archive's records into ``results_dir`` (see the module docstring for what is refused)."""
    if not archive.is_file():
        raise UserError(f"{archive}: no such archive")
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115  (closed by the `with` below, after the check)
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{archive}: not a readable tar archive ({err})") from None
    summary = UnpackSummary()
    with tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or member.name.startswith("/") or ".." in parts:
                summary.refused.append(f"{member.name}: not a plain file inside the archive's folder")
                continue
            if parts == ("campaign.log",):
                target = results_dir / "campaign-logs" / f"{archive.name.split('.')[0]}.log"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                summary.logs.append(str(target))
                continue
            if len(parts) != RECORD_MEMBER_PARTS or parts[0] != "runs" or not parts[2].endswith(".json"):
                continue  # tables, plots, checks: rebuilt by gather and check
            try:
                record = json.loads(tar.extractfile(member).read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            problem = _record_problem(member, record if isinstance(record, dict) else None)
            if problem:
                summary.refused.append(f"{member.name}: {problem}")
                continue
            target = results_dir / member.name
            if is_complete(read_record(target)):
                summary.kept.append(member.name)
                continue
            write_json_atomic(target, record)
            summary.added.append(member.name)
    return summary
