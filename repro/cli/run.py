"""``repro run``: a suite's runs that have no complete record yet, here, under torchrun or on Slurm."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from repro.cli.common import DATA_DIR_HELP, RESULTS_HELP, TIER_HELP
from repro.errors import UserError

#: ``repro run``'s flags (as argparse names them) that only the Slurm executor reads
SLURM_FLAGS = ("wait", "poll_every", "dry_run", "cluster", "partition", "time", "gpus_per_node", "cpus_per_task",
               "mem", "sbatch_option")


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
    _add_executor_arguments(run)


def _add_executor_arguments(run: argparse.ArgumentParser) -> None:
    where = run.add_argument_group("where runs execute (see README, 'Running a suite on a Slurm cluster')")
    where.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: one job per run through submitit")
    where.add_argument("--workers", type=int, default=1,
                       help="local: runs at once in separate processes, one GPU each or sharing the device "
                       "(default 1)")
    where.add_argument("--wait", action="store_true", help="slurm: return when every submitted job has ended")
    where.add_argument("--poll-every", default=None, metavar="DURATION",
                       help="slurm --wait: how often to ask the scheduler, e.g. 5s (default 30s)")
    where.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch scripts, submit nothing")
    where.add_argument("--cluster", type=Path, default=None, help="slurm: a YAML file with a 'cluster:' block")
    where.add_argument("--partition", default=None, help="slurm: the partition the jobs go to")
    where.add_argument("--time", type=int, default=None, help="slurm: minutes per job")
    where.add_argument("--gpus-per-node", type=int, default=None,
                       help="slurm: GPUs per job of a one-process run (a run with --nproc N gets N)")
    where.add_argument("--cpus-per-task", type=int, default=None, help="slurm: CPU cores per job")
    where.add_argument("--mem", type=float, default=None, help="slurm: memory per job in GB, a finite number above 0")
    where.add_argument("--sbatch-option", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: extra sbatch option, e.g. account=mylab (repeatable)")


def _submit(args: argparse.Namespace, request) -> int:
    from repro.execute.plan import parse_duration
    from repro.execute.slurm import SlurmExecutor, cluster_config, parse_sbatch_options

    cluster = cluster_config(args.cluster, {
        "partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem,
        "sbatch_options": parse_sbatch_options(args.sbatch_option)})
    poll_s = (parse_duration(args.poll_every, "--poll-every") if args.poll_every
              else 1.0 if cluster.scheduler == "local" else 30.0)
    if poll_s <= 0:
        raise UserError(f"--poll-every {args.poll_every}: allowed: a duration above 0, such as 5s")
    summary = SlurmExecutor(cluster, args.dry_run, args.wait, poll_s).run(request)
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
    from repro.execute.runner import check_data_parallel, resolve_device
    from repro.train.distributed import init_data_parallel, under_torchrun

    started = int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    slurm_only = next((name for name in SLURM_FLAGS if getattr(args, name) not in (None, False, [])), None)
    if args.executor == "local" and slurm_only:
        raise UserError(f"--{slurm_only.replace('_', '-')}: applies to --executor slurm")
    if args.workers > 1 and args.nproc > 1:
        raise UserError(f"--workers {args.workers}: a run with --nproc {args.nproc} already uses several processes; "
                        "pass one of them")
    if args.executor == "slurm" and args.workers > 1:
        raise UserError(f"--workers {args.workers}: applies to --executor local; on Slurm each run is a job")
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
        summary = executor.run(request)
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
