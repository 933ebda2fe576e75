"""``repro bundle``: wheels, data and the source commit for a GPU box that has only PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from repro.cli.common import DATA_DIR_HELP

DEFAULT_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    bundle = sub.add_parser("bundle", help="wheels, data and source commit for a GPU box that has only PyTorch")
    bundle.add_argument("out", type=Path, help="a new (or empty) folder for the bundle")
    bundle.add_argument("--dataset", action="append", default=None,
                        help="dataset whose files to include: fashion_mnist, the only one that ships as files small "
                        "enough to carry (default: fashion_mnist)")
    bundle.add_argument("--data-dir", type=Path, default=None, help=f"{DATA_DIR_HELP}, else Debian's copy")
    bundle.add_argument("--python-version", default="3.12", help="target CPython (default 3.12)")
    bundle.add_argument("--platform", action="append", default=None,
                        help="target platform tag (repeatable; default: manylinux x86-64 tags)")


def handle(args: argparse.Namespace) -> int:
    from repro.execute.bundle import write_bundle

    source = write_bundle(args.out, datasets=args.dataset or ["fashion_mnist"], data_dir=args.data_dir,
                          python_version=args.python_version, platforms=args.platform or DEFAULT_PLATFORMS,
                          repo=Path(__file__).resolve().parents[2])
    print(f"{args.out}: {len(source['wheels'])} wheels, {len(source['data'])} data files, "
          f"{source['bytes'] / 2**20:.1f} MiB, commit {source['git_commit']}")
    print(f"on the box: pip install --no-index --no-deps --target SITE {args.out}/wheels/*.whl; "
          f"PYTHONPATH=SITE REPRO_SOURCE_FILE={args.out}/source.json python -m repro ... --data-dir {args.out}/data")
    return 0
