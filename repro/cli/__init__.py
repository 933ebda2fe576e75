"""Command line: ``repro run | gather | check | list | compare``.

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

    gather = sub.add_parser("gather", help="run records -> pandas tables (csv, md), plots and an index")
    gather.add_argument("--results", type=Path, default=Path("results"))
    gather.add_argument("suites", nargs="*", help="suite names (default: every suite with records)")

    check = sub.add_parser("check", help="compare results with the suites' references; exit 1 on a failed check")
    check.add_argument("--results", type=Path, default=Path("results"))
    check.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")

    compare = sub.add_parser("compare", help="metric deltas between two results folders for the runs they share; "
                             "exit 1 when they differ beyond the tolerance")
    compare.add_argument("results_a", type=Path, help="reference results folder (e.g. the committed results/)")
    compare.add_argument("results_b", type=Path, help="results folder to judge (e.g. a fresh run)")
    compare.add_argument("suites", nargs="*", help="suite names (default: every suite with records)")
    compare.add_argument("--tolerance", type=float, default=0.5,
                         help="largest |B - A| still accepted, in each metric's unit (default 0.5: points of top-1)")

    sub.add_parser("list", help="the suites, their tiers and how many runs each expands to")
    return parser


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command in ``nproc`` processes under torchrun (``--`` keeps torchrun from reading its flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "repro", "--", *argv]
    return subprocess.run(command, check=False).returncode


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from repro.suite import run_suite
    from repro.suite.runner import check_data_parallel, resolve_device
    from repro.train.distributed import init_data_parallel, under_torchrun

    started = int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
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
        summary = run_suite(args.suite, args.tier, device=args.device, results_dir=args.results, force=args.force,
                            data_dir=args.data_dir, progress=not args.no_progress, data_parallel=data_parallel)
    finally:
        if data_parallel is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if data_parallel is not None and not data_parallel.is_main:
        return 0
    print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped, "
          f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
    return 1 if summary.failed else 0


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


def _cmd_compare(args: argparse.Namespace) -> int:
    from repro.results.compare import compare, report

    comparison = compare(args.results_a, args.results_b, tolerance=args.tolerance,
                         suites=[Path(s).stem for s in args.suites] or None)
    print(report(comparison, args.results_a, args.results_b))
    return 1 if comparison.verdict == "differs" else 0


def _minutes(expected: float | None) -> str:
    return "" if expected is None else f" (~{expected:g} min on 2 CPU cores)"


def _cmd_list(_: argparse.Namespace) -> int:
    from repro.suite import expand, list_suite_files, load_suite

    rows = []
    for path in list_suite_files():
        suite, _ = load_suite(path)
        tiers = ", ".join(f"{tier}: {len(expand(suite, tier))} runs{_minutes(spec.expected_minutes)}"
                          for tier, spec in suite.tiers.items())
        rows.append(f"{suite.name:<28} v{suite.version}  {suite.task:<8} {tiers}")
    print("\n".join(rows) if rows else "no suites found")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    commands = {"run": functools.partial(_cmd_run, argv=argv), "gather": _cmd_gather, "check": _cmd_check,
                "list": _cmd_list, "compare": _cmd_compare}
    try:
        return commands[args.command](args)
    except UserError as err:
        print(f"repro: error: {err}", file=sys.stderr)
        return 2
