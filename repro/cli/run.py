"""``repro run``: a suite's runs that have no complete record yet, here, under torchrun or on Slurm."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from repro.cli.common import (
    DATA_DIR_HELP,
    RESULTS_HELP,
    SLURM_FLAGS,
    TIER_HELP,
    add_executor_arguments,
    check_executor_flags,
    slurm_executor,
)
from repro.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a suite's runs that have no complete record yet; exit 1 when a run failed "
                         "or was left alone because another process (or host) holds its lock")
    run.add_argument("suite", help="suite file (suites/NAME.yaml) or suite name")
    run.add_argument("--tier", default="smoke", help=f"{TIER_HELP} (default smoke)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    run.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    run.add_argument("--force", action="store_true", help="run again even when a complete record exists")
    run.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    run.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    run.add_argument("--checkpoint-every", default="10m",
                     help="save a resumable training state this often (default 10m); an interrupted run resumes it")
    run.add_argument("--nproc", type=int, default=1,
                     help="data-parallel processes on this machine, started with torchrun (one per GPU; gloo on CPU); "
                     "for suites of task train whose runs set train.micro_batch")
    run.add_argument("--run-id", action="append", default=None, help="run only this run (repeatable)")
    run.add_argument("--seed", action="append", type=int, default=None,
                     help="run only the tier's runs of this seed (repeatable; with --run-id, runs matching both)")
    where = add_executor_arguments(run, "slurm --wait: how often to ask the scheduler, e.g. 5s (default 30s)")
    where.add_argument("--wait", action="store_true", help="slurm: return when every submitted job has ended")
    where.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch scripts, submit nothing")


def _submit(args: argparse.Namespace, request) -> int:
    from repro.execute.slurm import submit_suite

    executor = slurm_executor(args)
    summary = submit_suite(request, executor.cluster, dry_run=args.dry_run, wait=args.wait, poll_s=executor.poll_s)
    if args.dry_run:
        return 0
    if not args.wait:
        print(f"{summary.suite} ({summary.tier}): {len(summary.submitted)} submitted, {len(summary.skipped)} "
              f"complete, queued or running; `repro status {summary.suite} --tier {summary.tier}` follows them")
        return 0
    print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped, "
          f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
    return 1 if summary.failed else 0


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command in ``nproc`` processes under torchrun (``--`` keeps torchrun from reading its flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "repro", "--", *argv]
    return subprocess.run(command, check=False).returncode


def handle(args: argparse.Namespace, argv: list[str]) -> int:
    from repro.execute.base import SuiteRequest
    from repro.execute.local import SequentialExecutor, WorkerExecutor
    from repro.execute.plan import parse_duration
    from repro.execute.runner import check_data_parallel, execute_suite, resolve_device
    from repro.train.distributed import init_data_parallel, under_torchrun

    started = int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    check_executor_flags(args, (*SLURM_FLAGS, "wait", "dry_run"))
    if args.workers > 1 and args.nproc > 1:
        raise UserError(f"--workers {args.workers}: a run with --nproc {args.nproc} already uses several processes; "
                        "pass one of them")
    request = SuiteRequest(args.suite, args.tier, args.device, args.results, args.data_dir, args.force,
                           not args.no_progress, args.nproc, _selected_run_ids(args),
                           parse_duration(args.checkpoint_every, "--checkpoint-every"))
    if args.executor == "slurm":
        return _submit(args, request)
    if started > 1 and started != args.nproc:
        raise UserError(f"--nproc {args.nproc}: torchrun started {started} processes; pass --nproc {started}")
    device = resolve_device(args.device)
    data_parallel = None
    if args.nproc > 1:
        check_data_parallel(args.suite, args.tier, args.nproc)
        if started == 1:
            return _launch_torchrun(args.nproc, argv)
        data_parallel = init_data_parallel(use_cuda=device.type == "cuda")
    try:
        executor = WorkerExecutor(args.workers) if args.workers > 1 else SequentialExecutor(data_parallel)
        summary = execute_suite(executor, request, data_parallel=data_parallel)
    finally:
        if data_parallel is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if data_parallel is not None and not data_parallel.is_main:
        return 0
    locked = f" ({len(summary.locked)} locked by another process: see above)" if summary.locked else ""
    print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped{locked}, "
          f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
    return 1 if summary.failed or summary.locked else 0


def _selected_run_ids(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--run-id`` and ``--seed`` as the run ids to run (None: all of the tier's)."""
    if args.seed is None:
        return None if args.run_id is None else tuple(args.run_id)
    from repro.execute.runner import expand_tier

    _, path, runs = expand_tier(args.suite, args.tier)
    seeds = {run.setting["seed"] for run in runs}
    unknown = sorted(set(args.seed) - seeds)
    if unknown:
        allowed = ", ".join(map(str, sorted(seeds)))
        raise UserError(f"{path}: --seed {unknown[0]}: tier {args.tier} runs seeds {allowed}")
    return tuple(run.run_id for run in runs if run.setting["seed"] in args.seed
                 and (args.run_id is None or run.run_id in args.run_id))


def interrupted(args: argparse.Namespace) -> str:
    """The one line Ctrl-C prints during ``repro run``: how many of its runs have a complete record (kept: the
    same command skips them)."""
    from repro.execute.runner import expand_tier
    from repro.store.records import is_current, read_record, record_path

    try:
        suite, _, runs = expand_tier(args.suite, args.tier)
    except (UserError, KeyboardInterrupt):
        return "interrupted; the same command resumes"
    complete = sum(is_current(read_record(record_path(args.results, suite.name, run.run_id), warn=False),
                              run.shared_with)
                   for run in runs)
    return f"interrupted: {complete} runs complete; the same command resumes"
