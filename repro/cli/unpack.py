"""``repro unpack``: a campaign archive's records merged into a results folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    unpack = sub.add_parser("unpack", help="merge a campaign archive's records into a results folder")
    unpack.add_argument("archive", type=Path, help="a .tar.gz written by `repro campaign --archive` (at most 16 MiB)")
    unpack.add_argument("--results", type=Path, default=Path("results"), help="results folder to merge into "
                        "(default results/)")


def handle(args: argparse.Namespace) -> int:
    from repro.execute.archive import unpack

    summary = unpack(args.archive, args.results)
    for line in summary.refused:
        print(f"refused {line}", file=sys.stderr)
    print(f"{args.archive}: {len(summary.added)} records added, {len(summary.kept)} kept (complete already), "
          f"{len(summary.refused)} refused -> {args.results}; run `repro gather` and `repro check` next")
    return 1 if summary.refused else 0
