"""Help texts and suite arguments that several commands share, so that each says them the same way."""

from __future__ import annotations

from pathlib import Path

TIER_HELP = "a tier of the suite (each suite's tiers: `repro list`)"
RESULTS_HELP = "results folder (default results/)"
DATA_DIR_HELP = "folder holding local dataset copies (default: REPRO_DATA_DIR)"


def suite_refs(suites: list[str]) -> list[str] | None:
    """Suite arguments as gather and check take them: a suite file that exists as given (one outside suites/),
    else the suite's name; None for all the suites with records."""
    return [s if Path(s).is_file() else Path(s).stem for s in suites] or None
