"""Running a suite: expand, skip runs whose record is complete, run the rest, write each record atomically.

A run killed half-way leaves no record (records are written once, at the end, by rename), so the next
``repro run`` of the same suite resumes with exactly the runs that are missing or failed.
"""

from __future__ import annotations

import datetime
import functools
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro.errors import UserError
from repro.results.provenance import provenance
from repro.results.records import RECORD_SCHEMA, is_complete, read_record, record_path, write_json_atomic
from repro.suite.expand import expand
from repro.suite.load import file_sha256, load_suite
from repro.suite.tasks import TASKS, RunContext, RunOutcome, RunSpec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: allowed: auto, cpu, cuda")
    return torch.device(name)


@dataclass
class SuiteRunSummary:
    suite: str
    tier: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _outcome_or_failure(task, run: RunSpec, ctx: RunContext) -> tuple[RunOutcome, str | None]:
    """Run the task; an unexpected exception becomes a ``failed`` outcome so that the suite goes on."""
    start = time.perf_counter()
    try:
        return task.run(run, ctx), None
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:  # a bug or an OOM in one configuration must not lose the others
        summary = "".join(traceback.format_exception_only(err)).strip()
        tail = "".join(traceback.format_tb(err.__traceback__)[-3:])
        return RunOutcome("failed", {}, time.perf_counter() - start), f"{summary}\n{tail}"


def run_suite(suite_ref: str | Path, tier: str, *, device: str = "auto", results_dir: Path = Path("results"),
              force: bool = False, data_dir: Path | None = None, progress: bool = True,
              echo: Callable[[str], None] = print) -> SuiteRunSummary:
    suite, path = load_suite(suite_ref)
    if tier not in suite.tiers:
        raise UserError(f"{path}: tier {tier!r} is not defined; allowed: {', '.join(suite.tiers)}")
    runs = expand(suite, tier)
    torch_device = resolve_device(device)
    suite_sha = file_sha256(path)
    ctx = RunContext(torch_device, results_dir, data_dir, progress)
    task = TASKS.get(suite.task)()
    summary = SuiteRunSummary(suite.name, tier)
    fingerprint = functools.cache(lambda key: ctx.dataset(dict(key)).fingerprint())
    echo(f"suite {suite.name} v{suite.version}, tier {tier}: {len(runs)} runs on {torch_device} -> {results_dir}")
    for index, run in enumerate(runs, 1):
        path_out = record_path(results_dir, suite.name, run.run_id)
        prefix = f"[{index}/{len(runs)}] {run.label}"
        if not force and is_complete(read_record(path_out)):
            summary.skipped.append(run.run_id)
            echo(f"{prefix}: complete, skipped ({path_out.name})")
            continue
        started = _now()
        outcome, error = _outcome_or_failure(task, run, ctx)
        data = ctx.dataset(run.config["dataset"])
        record = {
            "schema": RECORD_SCHEMA, "suite": suite.name, "suite_version": suite.version, "run_id": run.run_id,
            "status": outcome.status, "tier": tier, "setting": run.setting, "config": run.config,
            "metrics": outcome.metrics, "curve": outcome.curve, "rows": outcome.rows,
            "wall_time_s": outcome.wall_time_s, "peak_memory_mb": outcome.peak_memory_mb,
            "images_per_s": outcome.images_per_s, "diverged_step": outcome.diverged_step, "extra": outcome.extra,
            "error": error, "started_at": started, "finished_at": _now(),
            "provenance": provenance(torch_device, fingerprint(tuple(sorted(run.config["dataset"].items()))),
                                     data.source, suite_sha),
        }
        write_json_atomic(path_out, record)
        summary.ran.append(run.run_id)
        if outcome.status == "failed":
            summary.failed.append(run.run_id)
            echo(f"{prefix}: FAILED: {error.splitlines()[0]}")
        elif outcome.status == "diverged":
            summary.diverged.append(run.run_id)
            echo(f"{prefix}: diverged at step {outcome.diverged_step}")
        else:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in outcome.metrics.items() if isinstance(v, float))
            echo(f"{prefix}: ok in {outcome.wall_time_s:.1f}s: {shown}")
    return summary
