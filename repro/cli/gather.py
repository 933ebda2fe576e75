"""``repro gather``: run records into tables, plots and an index."""

from __future__ import annotations

import argparse
from pathlib import Path

from repro.cli.common import RESULTS_HELP, suite_refs


def add_parser(sub: argparse._SubParsersAction) -> None:
    gather = sub.add_parser("gather", help="run records -> pandas tables (csv, md), plots and an index")
    gather.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    gather.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")


def handle(args: argparse.Namespace) -> int:
    from repro.results.gather import gather

    for results, paths in gather(args.results, suite_refs(args.suites)):
        stale = f" ({results.stale} stale records of an older version or recipe ignored)" if results.stale else ""
        runs = results.frame["run_id"].nunique() if not results.frame.empty else 0
        print(f"{results.name}: {runs} runs{stale}")
        print(paths[-1 if results.frame.empty else 1].read_text())
        for path in paths:
            print(f"  wrote {path}")
    print(f"wrote {args.results / 'README.md'}")
    return 0
