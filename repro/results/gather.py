"""``repro gather`` and ``repro check`` over a results folder.

Only records that belong to the current expansion of a suite file count (a changed recipe or version changes
run ids), so an edited suite never mixes old and new numbers: the others are counted as stale. A suite that
cannot be loaded stops gather and check with the suite's own error, before anything is written: a table is
never guessed from records alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from repro.errors import UserError
from repro.results.check import CheckResult, check, report_frame
from repro.results.forest import write_forest_plots
from repro.results.tables import markdown, metric_columns, records_frame, select, summarize, to_markdown
from repro.store.atomic import atomic_path, write_text_atomic
from repro.store.records import iter_records
from repro.suite.expand import expand
from repro.suite.load import load_suite, resolve_suite_path
from repro.suite.schema import Suite
from repro.suite.validate import setting_columns
from repro.tasks.base import TASKS


@dataclass
class SuiteResults:
    name: str
    suite: Suite
    frame: pd.DataFrame
    stale: int
    records: list[dict]  # the current runs' records, in the frame's order (their provenance, for the report)


def expansion_order(suite: Suite) -> dict[str, int]:
    """Each current run id's position in the suite's expansion (tables list settings in the suite's order)."""
    runs = [run for tier in suite.tiers for run in expand(suite, tier)]  # ids differ across tiers (tier is config)
    return {run.run_id: index for index, run in enumerate(runs)}


def load_all(results_dir: Path, names: list[str] | None) -> list[SuiteResults]:
    """Every suite's results, loaded before anything is written (a mistyped folder is an error, not created)."""
    if not results_dir.is_dir():
        raise UserError(f"--results {results_dir}: no such folder")
    return [load_results(results_dir, name) for name in names or suite_names(results_dir)]


def stale_counts(results_dir: Path, names: list[str] | None = None) -> dict[str, int]:
    """Records per suite that belong to no current run (an older version or recipe): reported, never used."""
    return {results.name: results.stale for results in load_all(results_dir, names) if results.stale}


def load_results(results_dir: Path, name: str) -> SuiteResults:
    """The records of the suite's current runs, in its expansion order; raises the suite's own error when the
    suite file is missing or invalid. ``name``: a suite in ``suites/`` or a suite file elsewhere (the
    experiments in ``benchmarks/experiments/``), or one the results folder keeps in its ``suites/`` (the suites
    ``repro battery`` generates)."""
    kept = results_dir / "suites" / f"{name}.yaml"
    suite, _ = load_suite(kept if kept.is_file() else resolve_suite_path(name))
    name = suite.name
    records = iter_records(results_dir, name)
    order = expansion_order(suite)
    stale = sum(r["run_id"] not in order for r in records)
    records = sorted((r for r in records if r["run_id"] in order), key=lambda r: order[r["run_id"]])
    return SuiteResults(name, suite, records_frame(records), stale, records)


def suite_names(results_dir: Path) -> list[str]:
    root = results_dir / "runs"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def columns_of(results: SuiteResults) -> list[str]:
    return [*setting_columns(results.suite), *TASKS.get(results.suite.task).extra_columns]


def table_metrics(results: SuiteResults, columns: list[str]) -> list[str]:
    """The metrics a suite's table shows: its task's own list where it has one, else every metric column."""
    metrics = metric_columns(results.frame, columns)
    shown = TASKS.get(results.suite.task).table_metrics
    return [m for m in shown if m in metrics] if shown else metrics


def write_plots(results: SuiteResults, folder: Path, fmt: str = "png") -> list[Path]:
    """The suite's own plots, one per plot and tier with records, as ``<suite>.<plot>.<tier>.<fmt>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for plot in results.suite.plots:
        if plot.y not in results.frame:
            print(f"repro: warning: {results.name}: plot {plot.name}: no metric {plot.y!r} in the records; "
                  "not drawn", file=sys.stderr)
            continue
        for tier, tier_frame in results.frame.groupby("tier"):
            frame = select(tier_frame, plot.where)
            if frame.empty:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for line, part in frame.groupby(plot.line):
                stats = part.groupby(plot.x)[plot.y].agg(["mean", "std"]).sort_index()
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                            label=str(line))
            if plot.logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(plot.x)
            ax.set_ylabel(plot.y)
            ax.set_title(f"{results.name} ({tier})")
            ax.legend(title=plot.line, fontsize="small")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = folder / f"{results.name}.{plot.name}.{tier}.{fmt}"
            with atomic_path(path) as partial:
                fig.savefig(partial, format=fmt, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def gather(results_dir: Path, names: list[str] | None = None) -> list[tuple[SuiteResults, list[Path]]]:
    """Write ``tables/<suite>.csv`` and ``.md`` (mean ± std over seeds, n), plots (the suite's own, and a forest
    plot of its relative claims per tier), and ``README.md``.

    Every suite is loaded before anything is written, and each file is replaced atomically."""
    tables = results_dir / "tables"
    loaded = load_all(results_dir, names)
    written = []
    for results in loaded:
        if results.frame.empty:  # nothing current: an older table must not stay to be read as current
            for old in [tables / f"{results.name}.csv", tables / f"{results.name}.runs.csv",
                        *tables.glob(f"{results.name}.*.png")]:
                old.unlink(missing_ok=True)
            note = tables / f"{results.name}.md"
            write_text_atomic(note, f"# {results.name}\n\nNo records of the current suite version "
                              f"({results.stale} stale records ignored).\n")
            written.append((results, [note]))
            continue
        name = results.name
        columns = columns_of(results)
        summary = summarize(results.frame, columns)
        write_text_atomic(tables / f"{name}.csv", summary.to_csv(index=False, float_format="%.4f"))
        metrics = table_metrics(results, columns)
        write_text_atomic(tables / f"{name}.md", f"# {name}\n\n{to_markdown(summary, columns, metrics)}\n")
        write_text_atomic(tables / f"{name}.runs.csv", results.frame.to_csv(index=False, float_format="%.4f"))
        tiers_run = set(results.frame["tier"])  # a tier without records would plot nothing but 'not run' rows
        claims = [result for result in check(results.suite, results.frame) if result.tier in tiers_run]
        written.append((results, [tables / f"{name}.csv", tables / f"{name}.md", *write_plots(results, tables),
                                  *write_forest_plots(claims, tables)]))
    write_index(results_dir)
    return written


def run_checks(results_dir: Path, names: list[str] | None = None) -> list[CheckResult]:
    """Check every suite (all loaded before anything is written); ``check.failing`` says which results fail."""
    out = [result for results in load_all(results_dir, names) for result in check(results.suite, results.frame)]
    for name, part in report_frame(out).groupby("suite") if out else []:
        table = markdown(part.drop(columns="suite"))
        write_text_atomic(results_dir / "checks" / f"{name}.md", f"# {name}: check\n\n{table}\n")
    write_index(results_dir)
    return out


def write_index(results_dir: Path) -> None:
    lines = ["# Results", "", "Generated by `repro gather` / `repro check`; do not edit by hand.", "",
             "| suite | runs | tiers | table | check |", "|---|---|---|---|---|"]
    for name in suite_names(results_dir):
        records = iter_records(results_dir, name, warn=False)
        tiers = ", ".join(sorted({r["tier"] for r in records}))
        table = f"[table](tables/{name}.md)" if (results_dir / "tables" / f"{name}.md").exists() else "—"
        checked = f"[check](checks/{name}.md)" if (results_dir / "checks" / f"{name}.md").exists() else "—"
        lines.append(f"| {name} | {len(records)} | {tiers} | {table} | {checked} |")
    write_text_atomic(results_dir / "README.md", "\n".join(lines) + "\n")
