"""Forest plots of relative claims: what each row draws, the files written, and gather writing them."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from PIL import Image

from repro.results.check import STATUSES, CheckResult
from repro.results.forest import STATUS_COLORS, forest_rows, write_forest_plots
from repro.results.gather import gather
from repro.store.atomic import write_json_atomic
from repro.store.records import RECORD_SCHEMA, record_path
from repro.suite.expand import expand
from repro.suite.load import load_suite


def _claim(reference: str, status: str, reproduced: float | None = None, low: float | None = None,
           high: float | None = None, *, bound_min: float | None = None, bound_max: float | None = None,
           kind: str = "relative", tier: str = "laptop", n: int = 6) -> CheckResult:
    return CheckResult("s", tier, reference, kind, "top1", reproduced, None, None, "[-1, +∞]", status, n, "d",
                       low=low, high=high, bound_min=bound_min, bound_max=bound_max)


#: one claim per drawn status: the inconclusive one's interval straddles its bound, the not-run one has no number
CLAIMS = [
    _claim("holds", "pass", -0.4, -0.8, 0.0, bound_min=-1.0),
    _claim("broken", "fail", -3.0, -3.5, -2.5, bound_min=-1.0),
    _claim("undecided", "inconclusive", -0.9, -1.4, -0.4, bound_min=-1.0, bound_max=1.0),
    _claim("same-computation", "by construction", 0.0, 0.0, 0.0, bound_max=0.5),
    _claim("missing", "not run", bound_min=-1.0, n=0),
]


def test_every_status_has_a_color() -> None:
    assert set(STATUS_COLORS) == set(STATUSES)
    assert len({STATUS_COLORS[s] for s in ("pass", "fail", "inconclusive", "by construction")}) == 4


def test_rows_follow_the_claims_with_their_numbers_bounds_and_colors() -> None:
    rows = forest_rows(CLAIMS)
    assert [row.label for row in rows] == ["holds (top1)", "broken (top1)", "undecided (top1)",
                                           "same-computation (top1)", "missing (top1)"]
    assert [row.color for row in rows] == [STATUS_COLORS[s] for s in
                                           ("pass", "fail", "inconclusive", "by construction", "not run")]
    assert [(row.point, row.low, row.high) for row in rows[:3]] == [(-0.4, -0.8, 0.0), (-3.0, -3.5, -2.5),
                                                                   (-0.9, -1.4, -0.4)]
    assert [row.bounds for row in rows] == [(-1.0,), (-1.0,), (-1.0, 1.0), (0.5,), (-1.0,)]
    missing = rows[-1]
    assert (missing.point, missing.low, missing.high) == (None, None, None)
    assert missing.status_text == "not run, n 0" and rows[0].status_text == "pass, n 6"


def test_a_claim_without_a_whole_finite_interval_gets_its_point_and_no_bar() -> None:
    one_seed = _claim("one-seed", "pass", 1.0, math.nan, math.nan, bound_min=0.0, n=2)
    half = _claim("half", "pass", 1.0, 0.5, None, bound_min=0.0)
    for row in forest_rows([one_seed, half]):
        assert (row.point, row.low, row.high) == (1.0, None, None)


def test_one_png_per_suite_and_tier_with_relative_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[plt.Figure] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figures to look at what they draw
    full = [_claim("holds", "pass", -0.4, -0.8, 0.0, bound_min=-1.0, tier="full")]
    absolute_only = [_claim("paper", "pass", 94.0, 93.5, 94.5, bound_min=93.0, bound_max=95.0, kind="absolute",
                            tier="smoke")]
    written = write_forest_plots([*CLAIMS, *full, *absolute_only], tmp_path)
    try:
        assert written == [tmp_path / "s.forest.laptop.png", tmp_path / "s.forest.full.png"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.forest.full.png", "s.forest.laptop.png"]
        sizes = []
        for path in written:
            with Image.open(path) as image:
                assert image.format == "PNG"
                sizes.append(image.size)
        assert sizes[0][1] > sizes[1][1]  # five rows stand taller than one

        ax = drawn[0].axes[0]
        assert ax.get_title() == "s · laptop · differences a − b with 95% intervals"
        assert [label.get_text() for label in ax.get_yticklabels()] == [row.label for row in forest_rows(CLAIMS)]
        assert [text.get_text() for text in ax.texts] == [row.status_text for row in forest_rows(CLAIMS)]
        points = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in points] == [(-0.4, 0), (-3.0, 1), (-0.9, 2),
                                                                                   (0.0, 3)]
        assert [line.get_color() for line in points] == [STATUS_COLORS[c.status] for c in CLAIMS[:4]]
        segments = sorted(tuple(round(v, 6) for v in segment.ravel())  # (x0, y0, x1, y1)
                          for collection in ax.collections for segment in collection.get_segments())
        bars = [(-0.8, 0, 0.0, 0), (-3.5, 1, -2.5, 1), (-1.4, 2, -0.4, 2), (0.0, 3, 0.0, 3)]
        bound_ticks = [(-1.0, -0.3, -1.0, 0.3), (-1.0, 0.7, -1.0, 1.3), (-1.0, 1.7, -1.0, 2.3), (1.0, 1.7, 1.0, 2.3),
                       (0.5, 2.7, 0.5, 3.3), (-1.0, 3.7, -1.0, 4.3)]
        assert segments == sorted(bars + bound_ticks)
    finally:
        for figure in drawn:
            close(figure)


def test_gather_writes_forest_plots_of_the_tiers_with_records(suites_dir: Path, tmp_path: Path) -> None:
    """The tiny suite's claim (gn − bn ≥ −100) applies to both tiers here; only the smoke tier has records."""
    suite_file = suites_dir / "tiny.yaml"
    suite_file.write_text(suite_file.read_text().replace("tiers: [smoke]", "tiers: [smoke, full]"))
    suite, _ = load_suite(suite_file)
    results = tmp_path / "results"
    for run, top1 in zip(expand(suite, "smoke"), (80.0, 79.0), strict=True):
        write_json_atomic(record_path(results, "tiny", run.run_id), {
            "schema": RECORD_SCHEMA, "suite": "tiny", "suite_version": 1, "run_id": run.run_id, "status": "ok",
            "tier": "smoke", "setting": run.setting, "config": {}, "metrics": {"top1": top1, "loss": 0.5}})

    ((_, paths),) = gather(results)
    forest = results / "tables" / "tiny.forest.smoke.png"
    assert forest in paths
    with Image.open(forest) as image:
        assert image.format == "PNG"
    assert not (results / "tables" / "tiny.forest.full.png").exists()
