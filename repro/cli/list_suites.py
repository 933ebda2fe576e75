"""``repro list``: the suites, their tiers and their runs, or what a registry holds and where each came from (a
module name that does not shadow ``list``)."""

from __future__ import annotations

import argparse

#: ``repro list --FLAG``: the registry kind it lists (repro.registry's ENTRY_POINT_GROUPS keys)
REGISTRY_FLAGS = {"normalizers": "normalizer", "methods": "adaptation method", "backbones": "backbone",
                  "datasets": "dataset", "tasks": "task"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    listing = sub.add_parser("list", help="the suites, their tiers and how many runs each expands to; or, with a "
                             "flag, the registered normalizers, methods, datasets, tasks or plugin backbones and "
                             "their source (repro, or a plugin's distribution and version)")
    for flag, kind in REGISTRY_FLAGS.items():
        listing.add_argument(f"--{flag}", action="store_true", help=f"list the registered {kind}s and their source"
                             + (" (timm's own models are not listed)" if kind == "backbone" else ""))


def _minutes(expected: float | None) -> str:
    return "" if expected is None else f" (~{expected:g} min on 2 CPU cores)"


def _registered(kind: str) -> list[str]:
    """One line per registered name of ``kind``: the name and where it came from."""
    import repro.suite  # noqa: F401  (every built-in registry is filled by importing the packages a suite uses)
    from repro.registry import plugin_backbones, plugin_of, registry_names

    names = plugin_backbones() if kind == "backbone" else registry_names(kind)
    rows = []
    for name in names:
        plugin = plugin_of(kind, name)
        source = "repro" if plugin is None else f"{plugin.distribution} {plugin.version} (module {plugin.module})"
        rows.append(f"{name:<24} {source}")
    return rows


def handle(args: argparse.Namespace) -> int:
    kinds = [kind for flag, kind in REGISTRY_FLAGS.items() if getattr(args, flag)]
    if kinds:
        for kind in kinds:
            if len(kinds) > 1:
                print(f"{kind}s:")
            print("\n".join(_registered(kind)) or f"no plugin {kind}s")
        return 0
    from repro.suite import expand, list_suite_files, load_suite

    rows = []
    for path in list_suite_files():
        suite, _ = load_suite(path)
        tiers = ", ".join(f"{tier}: {len(expand(suite, tier))} runs{_minutes(spec.expected_minutes)}"
                          for tier, spec in suite.tiers.items())
        rows.append(f"{suite.name:<28} v{suite.version}  {suite.task:<8} {tiers}")
    print("\n".join(rows) if rows else "no suites found")
    return 0
