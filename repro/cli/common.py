"""Help texts, suite arguments and executor flags that several commands share, so that each says them the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from repro.errors import UserError

TIER_HELP = "a tier of the suite (each suite's tiers: `repro list`)"
RESULTS_HELP = "results folder (default results/)"
DATA_DIR_HELP = "folder holding local dataset copies (default: REPRO_DATA_DIR)"


def suite_refs(suites: list[str]) -> list[str] | None:
    """Suite arguments as gather and check take them: a suite file that exists as given (one outside suites/),
    else the suite's name; None for all the suites with records."""
    return [s if Path(s).is_file() else Path(s).stem for s in suites] or None

#: the executor flags (as argparse names them) that only ``--executor slurm`` reads
SLURM_FLAGS = ("poll_every", "cluster", "partition", "time", "gpus_per_node", "cpus_per_task", "mem", "sbatch_option")


def add_executor_arguments(parser: argparse.ArgumentParser, poll_help: str) -> argparse._ArgumentGroup:
    """Where runs execute, as ``repro run`` and ``repro campaign`` both take it; the group, for a command's own
    flags."""
    where = parser.add_argument_group("where runs execute (see docs/slurm.md)")
    where.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: one job per run through submitit")
    where.add_argument("--workers", type=int, default=1,
                       help="local: runs at once in separate processes, one GPU each or sharing the device "
                       "(default 1)")
    where.add_argument("--poll-every", default=None, metavar="DURATION", help=poll_help)
    where.add_argument("--cluster", type=Path, default=None, help="slurm: a YAML file with a 'cluster:' block")
    where.add_argument("--partition", default=None, help="slurm: the partition the jobs go to")
    where.add_argument("--time", type=int, default=None, help="slurm: minutes per job")
    where.add_argument("--gpus-per-node", type=int, default=None,
                       help="slurm: GPUs per job of a one-process run (a run with --nproc N gets N)")
    where.add_argument("--cpus-per-task", type=int, default=None, help="slurm: CPU cores per job")
    where.add_argument("--mem", type=float, default=None, help="slurm: memory per job in GB, a finite number above 0")
    where.add_argument("--sbatch-option", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: extra sbatch option, e.g. account=mylab (repeatable)")
    return where


def check_executor_flags(args: argparse.Namespace, slurm_flags: tuple[str, ...] = SLURM_FLAGS) -> None:
    """Flags that do not go together: a Slurm flag on the local executor, workers on Slurm, fewer than 1 worker."""
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    slurm_only = next((name for name in slurm_flags if getattr(args, name) not in (None, False, [])), None)
    if args.executor == "local" and slurm_only:
        raise UserError(f"--{slurm_only.replace('_', '-')}: applies to --executor slurm")
    if args.executor == "slurm" and args.workers > 1:
        raise UserError(f"--workers {args.workers}: applies to --executor local; on Slurm each run is a job")


def slurm_executor(args: argparse.Namespace):
    """The Slurm executor the flags describe: the cluster file's block with the flags on top, polled every
    ``--poll-every`` (default 30s; 1s for submitit's local stand-in)."""
    from repro.execute.plan import parse_duration
    from repro.execute.slurm import SlurmExecutor, cluster_config, parse_sbatch_options

    cluster = cluster_config(args.cluster, {
        "partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem,
        "sbatch_options": parse_sbatch_options(args.sbatch_option)})
    poll_s = (parse_duration(args.poll_every, "--poll-every", above_zero=True) if args.poll_every
              else 1.0 if cluster.scheduler == "local" else 30.0)
    return SlurmExecutor(cluster, poll_s)
