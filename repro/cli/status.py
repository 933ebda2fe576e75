"""``repro status``: each run's state."""

from __future__ import annotations

import argparse
from pathlib import Path

from repro.cli.common import RESULTS_HELP, TIER_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="each run's state: pending, queued, running, ok, failed, diverged")
    status.add_argument("suite", help="suite file or suite name")
    status.add_argument("--tier", default="smoke", help=f"{TIER_HELP} (default smoke)")
    status.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)


def handle(args: argparse.Namespace) -> int:
    from repro.execute.jobs import run_states, status_lines
    from repro.execute.runner import expand_tier

    suite, _, runs = expand_tier(args.suite, args.tier)
    print(f"suite {suite.name} v{suite.version}, tier {args.tier}: {len(runs)} runs")
    print("\n".join(status_lines(run_states(suite.name, runs, args.results))))
    return 0
