"""One archive of a campaign's results (``pack``), and merging one into a results folder (``repro unpack``).

The archive holds the records of the campaign's suites, their tables, plots and checks, and the campaign log,
as a ``.tar.gz`` of at most 16 MiB (what a GPU window can send back in one file). It is written to a temporary
name and renamed, so a window cut short returns the last complete archive, never half of one.

Unpacking trusts nothing in the archive. It is read whole, as a stream within the limits below, before anything
is written, so a damaged, truncated or oversized archive changes nothing. Members must be plain files under
``runs/<suite>/`` of a suite in ``suites/``; a record's run id must be the hash of its own configuration (and its
file name), its suite, version, tier and setting those of that configuration; and a record never replaces a
complete one. Tables and checks are not copied: they describe the archive's folder, not the merged one, so
``repro gather`` and ``repro check`` rebuild them.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from repro.errors import UserError, printable
from repro.store.atomic import atomic_path, write_json_atomic, write_text_atomic
from repro.store.records import check_writable, is_complete, read_record, record_problem
from repro.suite.load import list_suite_files, suites_dir

#: what ``unpack`` reads at most: the archive (what ``pack`` writes at most), any one member of it (a record is
#: well under 1 MiB), all of it decompressed, and its number of members
MAX_ARCHIVE_BYTES = 16 * 2**20
MAX_MEMBER_BYTES = 16 * 2**20
MAX_UNPACKED_BYTES = 256 * 2**20
MAX_MEMBERS = 10_000
GZIP_MAGIC = b"\x1f\x8b"
RECORD_MEMBER_PARTS = 3  # runs/<suite>/<run_id>.json
#: the columns of every run's setting (grid keys come on top)
SETTING_COLUMNS = ("backbone", "normalizer", "seed")


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
    with atomic_path(archive) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return buffer.tell()


def check_archive_path(archive: Path) -> None:
    """Refuse, before a campaign's first run, an ``--archive`` that ``pack`` could not write: a folder, or a path
    under a file."""
    if archive.is_dir():
        raise UserError(f"--archive {archive}: is a folder; give a file name in it, e.g. {archive / 'window.tar.gz'}")
    check_writable(archive.parent, f"--archive {archive}")


@dataclass
class UnpackSummary:
    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


class _CappedStream:
    """The archive's decompressed bytes, cut off past ``MAX_UNPACKED_BYTES``: a 16 MiB archive can expand to
    gigabytes, and tarfile reads some headers (pax, long names) whole before a member can be checked."""

    def __init__(self, stream: BinaryIO, archive: Path) -> None:
        self.stream, self.archive, self.total = stream, archive, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        if self.total > MAX_UNPACKED_BYTES:
            raise UserError(f"{self.archive}: unpacks to more than {MAX_UNPACKED_BYTES // 2**20} MiB; "
                            "not an archive of `repro campaign --archive`")
        return data


def _members(archive: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """Each member of the archive with its content (empty for what is not a plain file), read as a stream within
    the limits. A member that declares more than ``MAX_MEMBER_BYTES``, too many members, or a damaged or
    truncated archive is a one-line ``UserError``."""
    with archive.open("rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if magic == GZIP_MAGIC else raw
        try:
            with tarfile.open(fileobj=_CappedStream(stream, archive), mode="r|") as tar:
                for count, member in enumerate(tar, 1):
                    name = printable(member.name)
                    if count > MAX_MEMBERS:
                        raise UserError(f"{archive}: more than {MAX_MEMBERS} members; not an archive of "
                                        "`repro campaign --archive`")
                    if member.size > MAX_MEMBER_BYTES:
                        raise UserError(f"{archive}: member {name} declares {member.size} bytes; a member may have "
                                        f"at most {MAX_MEMBER_BYTES // 2**20} MiB")
                    yield member, tar.extractfile(member).read() if member.isfile() else b""
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise UserError(f"{archive}: not a readable tar archive, or cut short ({type(err).__name__}: "
                            f"{printable(str(err))})") from None


def _record_problem(member: tarfile.TarInfo, record: dict | None, suites: set[str]) -> str | None:
    """Why a record member may not be merged, or None: gather and check must be able to use what is merged."""
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
    if suite not in suites:
        return f"suite {suite!r} has no suite file in {suites_dir()}/ (gather and check would stop on it)"
    return _contradiction(record)


def _contradiction(record: dict[str, Any]) -> str | None:
    """Where a record's fields (suite, tier, version, setting) disagree with its config, which its run id hashes:
    tables group runs by those fields, so a record must say what it ran."""
    from repro.suite.expand import config_value

    config = record["config"]
    for name in ("suite", "suite_version", "tier"):
        if record[name] != config.get(name):
            return f"field {name} {record[name]!r} contradicts its config ({config.get(name)!r})"
    missing = [column for column in SETTING_COLUMNS if column not in record["setting"]]
    if missing:
        return f"setting lacks {', '.join(missing)}"
    for column, value in record["setting"].items():
        try:
            expected = config_value(config, column)
        except (KeyError, TypeError):
            return f"setting {column} is no field of its config"
        if value != expected:
            return f"setting {column}={value!r} contradicts its config ({expected!r})"
    return None


def _log_target(folder: Path, stem: str, text: str) -> Path:
    """Where an archive's campaign log goes: ``<stem>.log``, else ``<stem>-2.log`` and on, so that two windows'
    archives of one name keep both logs; the same log unpacked again is found, not copied twice."""
    target, index = folder / f"{stem}.log", 1
    while target.exists() and target.read_text(errors="replace") != text:
        index += 1
        target = folder / f"{stem}-{index}.log"
    return target


def unpack(archive: Path, results_dir: Path) -> UnpackSummary:
    """Merge the archive's records into ``results_dir`` (see the module docstring for what is refused).

    The whole archive is read once before anything is written, so a damaged or oversized one changes nothing."""
    if not archive.is_file():
        raise UserError(f"{archive}: no such archive")
    size = archive.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise UserError(f"{archive}: {size} bytes; an archive may have at most {MAX_ARCHIVE_BYTES // 2**20} MiB")
    for _ in _members(archive):
        pass
    check_writable(results_dir, "--results")
    suites = {path.stem for path in list_suite_files()}
    summary = UnpackSummary()
    for member, data in _members(archive):
        parts, name = Path(member.name).parts, printable(member.name)
        if not member.isfile() or member.name.startswith("/") or ".." in parts:
            summary.refused.append(f"{name}: not a plain file inside the archive's folder")
            continue
        if parts == ("campaign.log",):
            text = data.decode("utf-8", errors="replace")
            target = _log_target(results_dir / "campaign-logs", archive.name.split(".")[0] or "campaign", text)
            if not target.exists():
                write_text_atomic(target, text)
            summary.logs.append(str(target))
            continue
        if len(parts) != RECORD_MEMBER_PARTS or parts[0] != "runs" or not parts[2].endswith(".json"):
            continue  # tables, plots, checks: rebuilt by gather and check
        try:
            record = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        problem = _record_problem(member, record if isinstance(record, dict) else None, suites)
        if problem:
            summary.refused.append(f"{name}: {printable(problem)}")
            continue
        target = results_dir / member.name
        if is_complete(read_record(target)):
            summary.kept.append(member.name)
            continue
        write_json_atomic(target, record)
        summary.added.append(member.name)
    return summary
