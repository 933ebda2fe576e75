"""Forest plots of a suite's relative claims: one per tier, one row per claim, written by ``repro gather``.

Each row shows the mean paired difference a − b with its confidence interval against that claim's own bounds,
so a reader sees at a glance how far each claim is from being decided. Only relative claims are drawn: an
absolute reference compares our mean with a paper's number in the metric's own unit (a top-1 near 94 against
differences near 0), and on a shared axis it would squash every difference to a dot; the check table lists it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from repro.results.check import CheckResult
from repro.store.atomic import atomic_path

#: one color per check status; statuses without a number (not run, incomplete) are pale, their rows still listed
STATUS_COLORS = {
    "pass": "tab:green",
    "fail": "tab:red",
    "inconclusive": "#e69f00",
    "by construction": "dimgrey",
    "not run": "darkgrey",
    "incomplete": "darkgrey",
}


@dataclass(frozen=True)
class ForestRow:
    """What one row of a forest plot draws; ``point``, ``low`` and ``high`` are None where there is no number."""

    label: str
    point: float | None
    low: float | None
    high: float | None
    bounds: tuple[float, ...]
    color: str
    status_text: str


def _number(value: float | None) -> float | None:
    """A finite value, else None: a NaN (e.g. the interval of a single paired seed) has nothing to draw."""
    return value if value is not None and math.isfinite(value) else None


def forest_rows(claims: list[CheckResult]) -> list[ForestRow]:
    """The rows of one plot, top to bottom: one per claim, in the order given (the suite file's)."""
    rows = []
    for claim in claims:
        low, high = _number(claim.low), _number(claim.high)
        has_interval = low is not None and high is not None
        rows.append(ForestRow(
            label=f"{claim.reference} ({claim.metric})",
            point=_number(claim.reproduced),
            low=low if has_interval else None,
            high=high if has_interval else None,
            bounds=tuple(b for b in (claim.bound_min, claim.bound_max) if _number(b) is not None),
            color=STATUS_COLORS[claim.status],
            status_text=f"{claim.status}, n {claim.n}",
        ))
    return rows


def _title(suite: str, tier: str, claims: list[CheckResult]) -> str:
    confidences = "/".join(f"{100 * c:g}" for c in sorted({claim.confidence for claim in claims}))
    return f"{suite} · {tier} · differences a − b with {confidences}% intervals"


def write_forest_plots(results: list[CheckResult], folder: Path, fmt: str = "png") -> list[Path]:
    """Write ``<suite>.forest.<tier>.<fmt>`` into ``folder`` for each suite and tier among ``results`` with a
    relative claim; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_plot: dict[tuple[str, str], list[CheckResult]] = defaultdict(list)
    for result in results:
        if result.kind == "relative":
            by_plot[result.suite, result.tier].append(result)
    written = []
    for (suite, tier), claims in by_plot.items():
        rows = forest_rows(claims)
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.4 * len(rows)))
        ax.axvline(0, color="grey", linewidth=1, linestyle=":")
        for y, row in enumerate(rows):
            if row.low is not None:
                ax.hlines(y, row.low, row.high, colors=row.color, linewidth=2)
            if row.point is not None:
                ax.plot(row.point, y, "o", color=row.color, zorder=3)  # over its bar and the bound ticks
            ax.annotate(row.status_text, xy=(1.02, y), xycoords=("axes fraction", "data"), va="center",
                        color=row.color, fontsize="small")
        bounds = [(bound, y) for y, row in enumerate(rows) for bound in row.bounds]
        ax.vlines([b for b, _ in bounds], [y - 0.3 for _, y in bounds], [y + 0.3 for _, y in bounds],
                  colors="black", linewidth=1.5)
        ax.set_yticks(range(len(rows)), [row.label for row in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first claim on top, as in the suite file
        ax.set_xlabel("a − b (the metric's unit; % of b for a percent claim) · black ticks: each claim's bounds")
        ax.set_title(_title(suite, tier, claims), fontsize="medium")
        ax.grid(axis="x", alpha=0.3)
        path = folder / f"{suite}.forest.{tier}.{fmt}"
        with atomic_path(path) as partial:  # "tight" keeps the status texts right of the axes
            fig.savefig(partial, format=fmt, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
