"""``repro battery``: one normalizer (or adaptation method) through the standard Fashion-MNIST protocol, next to
others, ending with a leaderboard."""

from __future__ import annotations

import argparse
from pathlib import Path

from repro.cli.common import DATA_DIR_HELP, RESULTS_HELP
from repro.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    battery = sub.add_parser(
        "battery", help="run a normalizer (or, with --method, an adaptation method) through the standard battery "
        "(suites/templates/battery.yaml: baseline, lr sweep, micro-batches 2 and 32, prediction-time BN and TENT "
        "under the 15 corruptions) as suites, gather and check them, and print a leaderboard; exit 1 when a run "
        "failed")
    battery.add_argument("name", help="a registered normalizer (`repro list --normalizers`), or method with --method")
    battery.add_argument("--method", action="store_true", help="NAME is an adaptation method: it runs under the "
                         "corruptions on the --against normalizers' models, next to source, ptbn and tent")
    battery.add_argument("--against", default=None, metavar="N1,N2",
                         help="normalizers to compare with, comma-separated (default: the template's, bn,gn)")
    battery.add_argument("--tier", default="smoke", choices=("smoke", "laptop", "full"),
                         help="smoke (CI, about a minute on 2 cores), laptop or full (default smoke)")
    battery.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    battery.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    battery.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    battery.add_argument("--workers", type=int, default=1, help="runs at once in separate processes (default 1)")
    battery.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")


def handle(args: argparse.Namespace) -> int:
    import yaml

    from repro.execute.base import SuiteRequest
    from repro.execute.local import SequentialExecutor, WorkerExecutor
    from repro.execute.runner import execute_suite
    from repro.results.check import STATUSES
    from repro.results.gather import gather, run_checks
    from repro.results.leaderboard import write_leaderboard
    from repro.suite.battery import battery_suites, template_path

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    against = ([name.strip() for name in args.against.split(",") if name.strip()] if args.against is not None
               else yaml.safe_load(template_path().read_text())["against"])
    if not against:
        raise UserError("--against: name at least one normalizer, e.g. bn,gn")
    battery = battery_suites(args.name, against, method=args.method, results_dir=args.results)
    failed = 0
    paths = [str(path) for _, path in battery.suites.values()]
    for path in paths:
        executor = WorkerExecutor(args.workers) if args.workers > 1 else SequentialExecutor()
        summary = execute_suite(executor, SuiteRequest(path, args.tier, args.device, args.results, args.data_dir,
                                                       progress=not args.no_progress))
        print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped, "
              f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
        failed += len(summary.failed)
    for _, written in gather(args.results, paths):
        print("wrote " + ", ".join(str(path) for path in written))
    checks = run_checks(args.results, paths)
    print("checks: " + (", ".join(f"{sum(r.status == status for r in checks)} {status}" for status in STATUSES
                                  if any(r.status == status for r in checks)) or "none"))
    text, written = write_leaderboard(battery, args.results, args.tier)
    print(text)
    print("wrote " + ", ".join(str(path) for path in written))
    return 1 if failed else 0
