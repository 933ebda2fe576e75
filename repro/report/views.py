"""What the site shows, as plain data for the templates: per suite its claims, table, references and provenance.

Every verdict is a ``CheckResult`` of ``repro.results.check.check`` over the records ``repro.results.gather``
loads, the same calls ``repro check`` makes, so the site cannot say anything ``repro check --json`` does not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from repro.results.check import STATUSES, CheckResult, bounds_text, check, format_number
from repro.results.compare import precision
from repro.results.gather import SuiteResults, columns_of, table_metrics
from repro.results.tables import mean_std_text, summarize
from repro.suite.load import resolve_suite_path
from repro.suite.schema import AbsoluteReference

#: the provenance tags of absolute references (docs/references.md)
TAGS = {
    "P": "primary: the paper or the authors' repository, read verbatim",
    "A": "the paper's abstract",
    "T": "a third-party transcription of the full text",
    "S": "secondary notes",
    "R": "repro's own derivation (an analysis, or a claim extended to a setting the paper does not report)",
    "U": "an unverified lead: a soft target only",
}
#: provenance fields that describe where and with what a record was computed, in the order the site lists them
PROVENANCE_FIELDS = ("device", "device_name", "cpu_threads", "processes", "precision", "torch", "cuda", "timm",
                     "python", "git_commit", "git_dirty")


def count_statuses(claims: list[CheckResult]) -> dict[str, int]:
    """How many claims have each verdict, in ``STATUSES``' order, verdicts that none has left out."""
    counted = Counter(claim.status for claim in claims)
    return {status: counted[status] for status in STATUSES if counted[status]}


@dataclass
class Cell:
    """A table cell: its text, the value a column sort orders it by (a number where the text has one), and a
    tooltip."""

    text: str
    sort: Any = None
    title: str | None = None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]


@dataclass
class TierView:
    """One tier of a suite: its claims' verdicts, and where and when its records were computed."""

    tier: str
    claims: list[CheckResult]
    runs: int
    hardware: list[str]
    versions: list[str]
    first: str
    last: str

    @property
    def counts(self) -> dict[str, int]:
        return count_statuses(self.claims)


@dataclass
class SuiteView:
    name: str
    version: int
    description: str
    citation: str
    task: str
    dataset: str
    suite_file: Path
    suite_text: str
    stale: int
    tiers: list[TierView]
    table: Table
    references: Table
    provenance: Table
    forest_plots: list[str] = field(default_factory=list)  # file names in the site's plots/
    plots: list[str] = field(default_factory=list)

    @property
    def claims(self) -> list[CheckResult]:
        return [claim for tier in self.tiers for claim in tier.claims]

    @property
    def counts(self) -> dict[str, int]:
        return count_statuses(self.claims)


def provenance_of(record: dict[str, Any]) -> dict[str, str]:
    """The fields of ``PROVENANCE_FIELDS`` of one record, as text ('—' where the record has none)."""
    prov = record.get("provenance") or {}
    values = {**prov, "precision": precision(record), "timm": (prov.get("packages") or {}).get("timm")}
    if values.get("git_commit"):
        values["git_commit"] = str(values["git_commit"])[:10]
    return {name: "—" if values.get(name) is None else str(values[name]) for name in PROVENANCE_FIELDS}


def _hardware(prov: dict[str, str]) -> str:
    count = prov["cpu_threads"]
    threads = "" if count == "—" else f", {count} thread{'' if count == '1' else 's'}"
    return f"{prov['device_name']} ({prov['device']}{threads}, {prov['precision']})"


def _versions(prov: dict[str, str]) -> str:
    return f"torch {prov['torch']}, timm {prov['timm']}, python {prov['python']}"


def _day(stamp: str | None) -> str:
    return stamp[:10] if stamp else "—"


def tier_view(tier: str, claims: list[CheckResult], records: list[dict[str, Any]]) -> TierView:
    provs = [provenance_of(record) for record in records]
    started = sorted(r["started_at"] for r in records if r.get("started_at"))
    finished = sorted(r["finished_at"] for r in records if r.get("finished_at"))
    return TierView(tier, claims, len(records), sorted({_hardware(p) for p in provs}),
                    sorted({_versions(p) for p in provs}), _day(started[0] if started else None),
                    _day(finished[-1] if finished else None))


def results_table(results: SuiteResults) -> Table:
    """Per tier and setting, each metric's mean ± std (SE) over seeds and the runs counted: the table
    ``repro gather`` writes, sortable by the means."""
    columns = columns_of(results)
    if results.frame.empty:
        return Table([], [])
    summary = summarize(results.frame, columns)
    metrics = [m for m in table_metrics(results, columns) if f"{m}_mean" in summary]
    keys = ["tier", *[c for c in columns if c in summary.columns]]
    counts = [c for c in ("n_diverged", "n_collapsed") if summary[c].any()]
    rows = []
    for _, row in summary.iterrows():
        cells = [Cell(str(row[k]), _sortable(row[k])) for k in keys]
        cells += [Cell(mean_std_text(row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_se"]), _sortable(row[f"{m}_mean"]))
                  for m in metrics]
        cells += [Cell(str(row[c]), int(row[c])) for c in ["n", *counts]]
        rows.append(cells)
    return Table([*keys, *metrics, "n", *(c.removeprefix("n_") for c in counts)], rows)


def _sortable(value: Any) -> Any:
    """A number to sort by, or None (sort by the text) for text and missing values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if pd.isna(number) else number


def references_table(results: SuiteResults) -> Table:
    """Each reference of the suite file: what it states, its source and its provenance tag (absolute ones)."""
    rows = []
    for ref in results.suite.references:
        if isinstance(ref, AbsoluteReference):
            states = f"{ref.value:g} ± {ref.tolerance:g} ({ref.tolerance_from or 'tolerance source not given'})"
            tag = Cell(ref.confidence, title=TAGS[ref.confidence])
            note = ref.note
        else:
            states = f"a − b{' in % of b' if ref.percent else ''} in {bounds_text(ref.min, ref.max)}"
            tag = Cell("—", title="a relative claim names its tag in its source")
            note = ref.claim
        rows.append([Cell(ref.id), Cell(ref.kind), Cell(ref.metric), Cell(states), Cell(", ".join(ref.tiers)),
                     Cell(ref.source), tag, Cell(note)])
    return Table(["reference", "kind", "metric", "states", "tiers", "source", "tag", "claim or note"], rows)


def provenance_table(records: list[dict[str, Any]]) -> Table:
    """The records grouped by where and with what they were computed: one row per tier and provenance."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        prov = provenance_of(record)
        groups.setdefault((record["tier"], *prov.values()), []).append(record)
    rows = []
    for key, members in groups.items():
        finished = sorted(r["finished_at"] for r in members if r.get("finished_at"))
        rows.append([*(Cell(value) for value in key), Cell(str(len(members)), len(members)),
                     Cell(_day(finished[0] if finished else None)), Cell(_day(finished[-1] if finished else None))])
    return Table(["tier", *PROVENANCE_FIELDS, "records", "first finished", "last finished"], rows)


def suite_view(results: SuiteResults) -> SuiteView:
    """The suite's claims (``repro check``'s results, tier by tier as the suite lists its references) and the
    tables of its page."""
    suite = results.suite
    claims = check(suite, results.frame)
    by_tier: dict[str, list[CheckResult]] = {}
    for claim in claims:
        by_tier.setdefault(claim.tier, []).append(claim)
    records_by_tier: dict[str, list[dict[str, Any]]] = {}
    for record in results.records:
        records_by_tier.setdefault(record["tier"], []).append(record)
    tiers = [tier_view(tier, by_tier.get(tier, []), records_by_tier.get(tier, []))
             for tier in suite.tiers if tier in by_tier or tier in records_by_tier]
    path = resolve_suite_path(results.name)
    return SuiteView(results.name, suite.version, suite.description.strip(), suite.citation.strip(), suite.task,
                     suite.dataset.name, path, path.read_text(), results.stale, tiers, results_table(results),
                     references_table(results), provenance_table(results.records))


def claim_cells(claim: CheckResult) -> dict[str, str]:
    """A claim's numbers as the site prints them: mean ± SE, the interval at its confidence, the bound."""
    se = "" if claim.se is None else f" ± {format_number(claim.se)}"
    interval = "—" if claim.low is None else (
        f"[{format_number(claim.low)}, {format_number(claim.high)}] ({claim.confidence:.0%})")
    reported = "" if claim.reported is None else f"{claim.reported:g} "
    return {"mean": f"{format_number(claim.reproduced)}{se}", "interval": interval,
            "bound": f"{reported}{claim.tolerance}"}
