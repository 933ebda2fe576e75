"""``repro check``: results against the suites' references."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from repro.cli.common import RESULTS_HELP, suite_refs


def add_parser(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check", help="compare results with the suites' references; exit 1 on a failed check")
    check.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    check.add_argument("--strict", action="store_true",
                       help="also exit 1 when a reference is 'not run' or 'incomplete' (use in CI and campaigns)")
    check.add_argument("--json", action="store_true",
                       help="print the results as a JSON list, one object per reference and tier (status: the "
                       "verdict), instead of the report; notes go to stderr; same exit status")
    check.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")


def handle(args: argparse.Namespace) -> int:
    from repro.results.check import STATUSES, failing, report_frame, to_json
    from repro.results.gather import run_checks, stale_counts
    from repro.results.tables import markdown

    names = suite_refs(args.suites)
    results = run_checks(args.results, names)
    notes = sys.stderr if args.json else sys.stdout  # stdout holds the JSON alone
    for name, count in stale_counts(args.results, names).items():
        print(f"{name}: {count} stale records (an older version or recipe) ignored", file=notes)
    if args.json:
        print(json.dumps(to_json(results), indent=1))
        return 1 if failing(results, strict=args.strict) or (args.strict and not results) else 0
    if not results:
        print(f"no references to check in {args.results}")
        return 1 if args.strict else 0
    print(markdown(report_frame(results)))
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    for status in ("fail", "inconclusive", "by construction"):
        listed = [r for r in results if r.status == status]
        if listed:
            print(f"\n{status}:")
            for r in listed:
                print(f"  {r.suite} {r.tier} {r.reference}: {_verdict_line(r)}")
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['inconclusive']} inconclusive, "
          f"{counts['by construction']} by construction, {counts['not run']} not run, "
          f"{counts['incomplete']} incomplete")
    return 1 if failing(results, strict=args.strict) else 0


def _verdict_line(result) -> str:
    """n, mean ± SE and the interval against the bound: what decided a verdict, on one line."""
    if result.reproduced is None:
        return result.detail
    se = "" if result.se is None else f" ± {result.se:.2f} SE"
    spread = "no interval" if result.low is None else (
        f"{result.confidence:.0%} CI [{result.low:.2f}, {result.high:.2f}]")
    decide = f"; ~{result.seeds_to_decide} seeds would decide it" if result.seeds_to_decide else ""
    return f"n {result.n}, {result.reproduced:.2f}{se}, {spread} vs {result.tolerance}{decide}"
