"""``repro report``: a static results site of a results folder, or a compare page of two."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from repro.cli.common import RESULTS_HELP, suite_refs
from repro.cli.compare import JUDGING_DEFAULTS, add_judging_options
from repro.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="write a static, self-contained site of a results folder (index, a page "
                            "per suite: claims and verdicts, results table, plots, references, suite file, "
                            "provenance), or with --compare a page of two results folders")
    report.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    report.add_argument("--out", type=Path, default=None,
                        help="folder to write the site into, replaced whole (default: RESULTS/site, or "
                        "B/compare-site with --compare); must be new, empty, or a site repro report wrote")
    report.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), default=None,
                        help="instead, a page of `repro compare A B`: the runs they share, the settings that moved "
                        "highlighted")
    report.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                        help="also save a screenshot of the index page there (needs Debian's chromium)")
    add_judging_options(report, with_defaults=False)
    report.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")


def handle(args: argparse.Namespace) -> int:
    from repro.report.screenshot import screenshot
    from repro.report.site import build_compare, build_site, site_bytes

    if args.screenshot is not None and args.screenshot.suffix.lower() != ".png":
        raise UserError(f"--screenshot {args.screenshot}: allowed: a .png file")
    given = [f"--{name}" for name in JUDGING_DEFAULTS if getattr(args, name) is not None]
    if given and not args.compare:
        raise UserError(f"{', '.join(given)}: judge a comparison, so only allowed with --compare A B")
    for name, value in JUDGING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    start = time.perf_counter()
    if args.compare:
        from repro.results.compare import compare

        results_a, results_b = args.compare
        out = args.out or results_b / "compare-site"
        comparison = compare(results_a, results_b, tolerance=args.tolerance, confidence=args.confidence,
                             match=args.match, suites=[Path(s).stem for s in args.suites] or None)
        build_compare(comparison, results_a, results_b, out)
        what = f"compare page of {results_a} and {results_b} (verdict: {comparison.verdict})"
    else:
        out = args.out or args.results / "site"
        views = build_site(args.results, out, suite_refs(args.suites))
        what = f"site of {args.results}: {len(views)} suites, {sum(len(v.claims) for v in views)} claims"
    index = out / "index.html"
    print(f"{what}, {site_bytes(out) / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    if args.screenshot is not None:
        screenshot(index, args.screenshot)
        print(f"screenshot of the index: {args.screenshot}")
    print(f"open {index.resolve()}")
    return 0
