"""``repro list``: the suites, their tiers and their runs (a module name that does not shadow ``list``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("list", help="the suites, their tiers and how many runs each expands to")


def _minutes(expected: float | None) -> str:
    return "" if expected is None else f" (~{expected:g} min on 2 CPU cores)"


def handle(_: argparse.Namespace) -> int:
    from repro.suite import expand, list_suite_files, load_suite

    rows = []
    for path in list_suite_files():
        suite, _ = load_suite(path)
        tiers = ", ".join(f"{tier}: {len(expand(suite, tier))} runs{_minutes(spec.expected_minutes)}"
                          for tier, spec in suite.tiers.items())
        rows.append(f"{suite.name:<28} v{suite.version}  {suite.task:<8} {tiers}")
    print("\n".join(rows) if rows else "no suites found")
    return 0
