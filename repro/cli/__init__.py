"""Command line: ``repro run | status | gather | check | report | list | compare | campaign | unpack | bundle |
battery``.

User errors (a bad suite file, a missing dataset, a bad flag) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys

from repro.cli import battery, bundle, campaign, check, compare, gather, list_suites, report, run, status, unpack
from repro.errors import UserError
from repro.process import keep_freed_memory
from repro.registry import use_plugin_modules

#: one module per command, in the order ``repro --help`` lists them: each adds its parser and handles its command
COMMANDS = {"run": run, "status": status, "gather": gather, "check": check, "report": report, "compare": compare,
            "list": list_suites, "campaign": campaign, "unpack": unpack, "bundle": bundle, "battery": battery}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                             help="import MODULE first, a plugin that registers normalizers, methods, backbones, "
                             "datasets or tasks (repeatable; installed plugins' entry points load by themselves)")
    return parser


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    # ``repro run`` re-runs its own command line under torchrun (--nproc)
    handle = functools.partial(run.handle, argv=argv) if args.command == "run" else COMMANDS[args.command].handle
    try:
        use_plugin_modules(args.plugin)
        return handle(args)
    except UserError as err:
        print(f"repro: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(run.interrupted(args) if args.command == "run" else "interrupted", file=sys.stderr)
        return 130
