"""Command line: ``repro run | status | gather | check | list``.

User errors (a bad suite file, a missing dataset, a bad flag) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

from repro.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite's runs that have no complete record yet")
    run.add_argument("suite", help="suite file (suites/NAME.yaml) or suite name")
    run.add_argument("--tier", default="smoke", help="tier to run (smoke or full; default smoke)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    run.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results/)")
    run.add_argument("--force", action="store_true", help="run again even when a complete record exists")
    run.add_argument("--data-dir", type=Path, default=None, help="folder holding local dataset copies")
    run.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    run.add_argument("--nproc", type=int, default=1,
                     help="data-parallel processes on this machine, started with torchrun (one per GPU; gloo on CPU)")
    run.add_argument("--run-id", action="append", default=None, help="run only this run (repeatable)")
    _add_executor_arguments(run)

    status = sub.add_parser("status", help="each run's state: pending, queued, running, ok, failed, diverged")
    status.add_argument("suite", help="suite file or suite name")
    status.add_argument("--tier", default="smoke", help="tier (default smoke)")
    status.add_argument("--results", type=Path, default=Path("results"))

    gather = sub.add_parser("gather", help="run records -> pandas tables (csv, md), plots and an index")
    gather.add_argument("--results", type=Path, default=Path("results"))
    gather.add_argument("suites", nargs="*", help="suite names (default: every suite with records)")

    check = sub.add_parser("check", help="compare results with the suites' references; exit 1 on a failed check")
    check.add_argument("--results", type=Path, default=Path("results"))
    check.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")

    sub.add_parser("list", help="the suites, their tiers and how many runs each expands to")
    return parser


def _add_executor_arguments(run: argparse.ArgumentParser) -> None:
    where = run.add_argument_group("where runs execute (see README, 'Running a suite on a Slurm cluster')")
    where.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: one job per run through submitit")
    where.add_argument("--workers", type=int, default=1,
                       help="local: runs at once in separate processes, one GPU each or sharing the device")
    where.add_argument("--wait", action="store_true", help="slurm: return when every submitted job has ended")
    where.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch scripts, submit nothing")
    where.add_argument("--cluster", type=Path, default=None, help="slurm: a YAML file with a 'cluster:' block")
    where.add_argument("--partition", default=None)
    where.add_argument("--time", type=int, default=None, help="minutes per job")
    where.add_argument("--gpus-per-node", type=int, default=None)
    where.add_argument("--cpus-per-task", type=int, default=None)
    where.add_argument("--mem", type=float, default=None, help="GB per job")
    where.add_argument("--sbatch-option", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. account=mylab (repeatable)")


def _submit(args: argparse.Namespace, request) -> int:
    from repro.execute.slurm import SlurmExecutor, cluster_config, parse_sbatch_options

    cluster = cluster_config(args.cluster, {
        "partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem,
        "sbatch_options": parse_sbatch_options(args.sbatch_option)})
    poll_s = 1.0 if cluster.scheduler == "local" else 30.0
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


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from repro.execute.base import SuiteRequest
    from repro.execute.local import SequentialExecutor, WorkerExecutor
    from repro.suite.runner import check_data_parallel, resolve_device
    from repro.train.distributed import init_data_parallel, under_torchrun

    started = int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    if args.executor == "local" and (args.wait or args.dry_run):
        raise UserError(f"--{'wait' if args.wait else 'dry-run'}: applies to --executor slurm")
    if args.workers > 1 and args.nproc > 1:
        raise UserError(f"--workers {args.workers}: a run with --nproc {args.nproc} already uses several processes; "
                        "pass one of them")
    if args.executor == "slurm" and args.workers > 1:
        raise UserError(f"--workers {args.workers}: applies to --executor local; on Slurm each run is a job")
    request = SuiteRequest(args.suite, args.tier, args.device, args.results, args.data_dir, args.force,
                           not args.no_progress, args.nproc, None if args.run_id is None else tuple(args.run_id))
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
    print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped, "
          f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
    return 1 if summary.failed else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from repro.execute.jobs import run_states, status_lines
    from repro.suite.runner import expand_tier

    suite, _, runs = expand_tier(args.suite, args.tier)
    print(f"suite {suite.name} v{suite.version}, tier {args.tier}: {len(runs)} runs")
    print("\n".join(status_lines(run_states(suite.name, runs, args.results))))
    return 0


def _cmd_gather(args: argparse.Namespace) -> int:
    from repro.results.gather import gather

    for results, paths in gather(args.results, [Path(s).stem for s in args.suites] or None):
        stale = f" ({results.stale} stale records of an older recipe ignored)" if results.stale else ""
        print(f"{results.name}: {results.frame['run_id'].nunique()} runs{stale}")
        print((paths[1]).read_text())
        for path in paths:
            print(f"  wrote {path}")
    print(f"wrote {args.results / 'README.md'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from repro.results.check import report_frame
    from repro.results.gather import run_checks

    results = run_checks(args.results, [Path(s).stem for s in args.suites] or None)
    if not results:
        print(f"no references to check in {args.results}")
        return 0
    print(report_frame(results).to_markdown(index=False))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "not run")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['not run']} not run")
    return 1 if counts["fail"] else 0


def _cmd_list(_: argparse.Namespace) -> int:
    from repro.suite import expand, list_suite_files, load_suite

    rows = []
    for path in list_suite_files():
        suite, _ = load_suite(path)
        tiers = ", ".join(f"{tier}: {len(expand(suite, tier))} runs" for tier in suite.tiers)
        rows.append(f"{suite.name:<28} v{suite.version}  {suite.task:<8} {tiers}")
    print("\n".join(rows) if rows else "no suites found")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    commands = {"run": functools.partial(_cmd_run, argv=argv), "status": _cmd_status, "gather": _cmd_gather,
                "check": _cmd_check, "list": _cmd_list}
    try:
        return commands[args.command](args)
    except UserError as err:
        print(f"repro: error: {err}", file=sys.stderr)
        return 2
