"""``repro compare``: metric deltas between two results folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser("compare", help="metric deltas between two results folders for the runs they share; "
                             "exit 1 when a setting differs beyond seed noise (or the tolerance, for single runs), "
                             "a run's status changed, or a record or metric of A is missing or unreadable in B")
    compare.add_argument("results_a", type=Path, help="reference results folder (e.g. the committed results/)")
    compare.add_argument("results_b", type=Path, help="results folder to judge (e.g. a fresh run)")
    compare.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")
    add_judging_options(compare)


#: ``repro compare``'s judging defaults, also those of ``repro report --compare``
JUDGING_DEFAULTS = {"tolerance": 0.5, "match": "run_id", "confidence": 0.95}


def add_judging_options(parser: argparse.ArgumentParser, *, with_defaults: bool = True) -> None:
    """How two folders' runs are paired and judged: ``repro compare``'s options, shared by ``repro report
    --compare``. ``with_defaults=False`` leaves them None, so that a command can tell whether they were given."""
    default = JUDGING_DEFAULTS if with_defaults else dict.fromkeys(JUDGING_DEFAULTS)
    parser.add_argument("--tolerance", type=float, default=default["tolerance"],
                        help="largest |B - A| still accepted where a setting has a single seed in common, in each "
                        "metric's unit (default 0.5: points of top-1)")
    parser.add_argument("--match", choices=("run_id", "setting"), default=default["match"],
                        help="pair runs by run id (the same recipe and seed; default), or by suite, tier and setting "
                             "(seed included), to compare two recipes of the same settings, e.g. float32 and bf16")
    parser.add_argument("--confidence", type=float, default=default["confidence"],
                        help="level of the t-interval of the differences paired by seed, where a setting has 2 or "
                        "more seeds in common; 0 within it is 'within noise' (default 0.95)")


def handle(args: argparse.Namespace) -> int:
    from repro.results.compare import compare, report

    comparison = compare(args.results_a, args.results_b, tolerance=args.tolerance, confidence=args.confidence,
                         match=args.match, suites=[Path(s).stem for s in args.suites] or None)
    print(report(comparison, args.results_a, args.results_b))
    return 1 if comparison.verdict == "differs" else 0
