"""``repro report``: a static site of a results folder, and a compare page of two.

The site is self-contained: HTML from Jinja2 templates, one small CSS and one small JS file of this package, and
matplotlib SVG plots, so that it opens from a cluster's file system or a CI artifact without a network. It is
written whole into a temporary folder and then takes ``--out``'s place: a failure leaves the old site.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from repro.errors import UserError
from repro.report.views import TAGS, SuiteView, claim_cells, count_statuses, suite_view
from repro.results.check import STATUSES, format_number
from repro.results.compare import Comparison
from repro.results.forest import STATUS_COLORS, write_forest_plots
from repro.results.gather import load_all, suite_names, write_plots
from repro.store.atomic import atomic_folder

#: a file every site holds: ``--out`` may replace a folder that has it, never another non-empty folder
MARKER = ".repro-report"
STATIC = Path(__file__).parent / "static"
#: verdicts of ``repro compare`` that mean a setting moved, and the class its row gets
MOVED = {"differs": "moved-differs", "within noise": "moved-within", "within tolerance": "moved-within"}


def _environment() -> jinja2.Environment:
    from matplotlib.colors import to_hex

    env = jinja2.Environment(loader=jinja2.PackageLoader("repro.report"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    env.filters["slug"] = lambda status: status.replace(" ", "-")
    env.globals.update(statuses=STATUSES, colors={s: to_hex(c) for s, c in STATUS_COLORS.items()},
                       claim_cells=claim_cells, tags=TAGS, moved=MOVED,
                       built=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    return env


def check_out_folder(out: Path) -> None:
    """``out`` is new, empty, or a site an earlier report wrote (which it replaces)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file; allowed: a new or empty folder, or one repro report wrote")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out}: a folder that repro report did not write (no {MARKER}); allowed: a new or "
                        "empty folder, or one repro report wrote")


@contextlib.contextmanager
def _site(out: Path) -> Iterator[Path]:
    """A folder to write the site into, with its assets, that replaces ``out`` when all of it is written."""
    check_out_folder(out)
    with atomic_folder(out) as staging:
        shutil.copytree(STATIC, staging / "assets")
        yield staging
        (staging / MARKER).write_text("written by repro report; --out may replace this folder\n")


def _svg_plots():
    """matplotlib settings for the site's plots: text as text (a fraction of the size of glyph paths), and ids
    that are the same from one build to the next."""
    import matplotlib

    matplotlib.use("Agg")
    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "repro-report"})


def build_site(results_dir: Path, out: Path, names: list[str] | None = None) -> list[SuiteView]:
    """Write ``out/index.html``, ``out/suites/<suite>.html`` and their plots for the suites with records in
    ``results_dir`` (or ``names``); returns what the pages show."""
    if results_dir.is_dir() and not names and not suite_names(results_dir):
        raise UserError(f"--results {results_dir}: no records (no runs/<suite>/ folder); nothing to report")
    loaded = load_all(results_dir, names)  # every suite loaded before anything is written
    env = _environment()
    with _site(out) as site, _svg_plots():
        plots = site / "plots"
        views = []
        for results in loaded:
            view = suite_view(results)
            tiers_run = set(results.frame["tier"]) if not results.frame.empty else set()
            view.forest_plots = [path.name for path in write_forest_plots(
                [claim for claim in view.claims if claim.tier in tiers_run], plots, "svg")]
            view.plots = [path.name for path in write_plots(results, plots, "svg")] if tiers_run else []
            views.append(view)
        (site / "suites").mkdir()
        for view in views:
            (site / "suites" / f"{view.name}.html").write_text(env.get_template("suite.html").render(
                suite=view, root="../", title=view.name))
        claims = [claim for view in views for claim in view.claims]
        (site / "index.html").write_text(env.get_template("index.html").render(
            suites=views, all_claims=claims, total=count_statuses(claims), results_dir=results_dir, root="",
            title="repro results"))
    return views


def build_compare(comparison: Comparison, results_a: Path, results_b: Path, out: Path) -> Path:
    """Write ``out/index.html``: ``repro compare``'s view of two results folders, the settings that moved
    highlighted; returns its path."""
    env = _environment()
    settings = comparison.settings.assign(moved=comparison.settings["verdict"] != "identical",
                                          size=-comparison.settings["delta"].abs())
    settings = settings.assign(order=settings["verdict"].map({"differs": 0}).fillna(1))
    moved = settings[settings["moved"]].sort_values(["order", "size"], na_position="first")
    with _site(out) as site:
        (site / "index.html").write_text(env.get_template("compare.html").render(
            comparison=comparison, moved_rows=moved.to_dict("records"), identical=int((~settings["moved"]).sum()),
            results_a=results_a, results_b=results_b, level=f"{100 * comparison.confidence:g}%", root="",
            title=f"compare {results_a} and {results_b}"))
    return out / "index.html"


def site_bytes(out: Path) -> int:
    return sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
