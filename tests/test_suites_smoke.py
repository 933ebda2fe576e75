"""Every suite in suites/ runs its smoke tier end to end on CPU and agrees with its smoke-tier checks.

This is what keeps the full-tier suites honest in CI: their smoke tiers run the same code path (loading,
model building, the task, records, tables, checks) on a few real or generated images, and their numbers are
compared with the committed smoke records (``repro compare``).
"""

from pathlib import Path

import pytest

from repro.execute import run_suite
from repro.results.check import CheckResult
from repro.results.compare import compare, report
from repro.results.gather import gather, run_checks
from repro.store.records import read_record, record_path
from repro.suite import expand, load_suite

ROOT = Path(__file__).parents[1]
SUITES = sorted((ROOT / "suites").glob("*.yaml"))


def agrees(result: CheckResult) -> bool:
    """A smoke check agrees with its reference: it passes, or its one seed gives no interval (inconclusive) while
    its point lies within the bounds: the code paths compute what the claim says, with no evidence of size."""
    if result.status == "pass":
        return True
    single = result.status == "inconclusive" and result.n == 1 and result.low is None
    return single and (result.bound_min is None or result.reproduced >= result.bound_min) and (
        result.bound_max is None or result.reproduced <= result.bound_max)


@pytest.mark.slow
@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_smoke_tier_runs_and_agrees_with_its_checks(path: Path, tmp_path: Path) -> None:
    suite, _ = load_suite(path)
    summary = run_suite(path, "smoke", device="cpu", results_dir=tmp_path, progress=False, echo=lambda _: None)
    assert not summary.failed, [read_record(record_path(tmp_path, suite.name, r))["error"] for r in summary.failed]
    assert len(summary.ran) == len(expand(suite, "smoke"))
    gather(tmp_path, [suite.name])
    assert (tmp_path / "tables" / f"{suite.name}.csv").is_file()
    smoke_checks = [c for c in run_checks(tmp_path, [suite.name]) if c.tier == "smoke"]
    assert [(c.reference, c.status, c.detail) for c in smoke_checks if not agrees(c)] == []

    # a regression report against the committed smoke records of the same run ids (same code, same kind of
    # machine: identical numbers expected; 1 point of slack so that a BLAS or CPU difference is reported, not fatal)
    committed = ROOT / "results"
    missing = [r.run_id for r in expand(suite, "smoke") if not record_path(committed, suite.name, r.run_id).is_file()]
    assert not missing, f"results/ lacks the smoke records {missing}: run the suite's smoke tier and commit them"
    comparison = compare(committed, tmp_path, tolerance=1.0, suites=[suite.name])
    assert comparison.verdict != "differs", report(comparison, committed, tmp_path)


EXPERIMENTS = sorted((ROOT / "benchmarks" / "experiments").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_smoke_tier_runs_and_gathers(path: Path, tmp_path: Path) -> None:
    """The experiments kept outside suites/ (benchmarks/experiments/) run their smoke tiers too, so that a change
    that breaks them shows in CI rather than when someone reruns a finding."""
    suite, _ = load_suite(path)
    summary = run_suite(path, "smoke", device="cpu", results_dir=tmp_path, progress=False, echo=lambda _: None)
    assert not summary.failed, [read_record(record_path(tmp_path, suite.name, r))["error"] for r in summary.failed]
    assert len(summary.ran) == len(expand(suite, "smoke"))
    gather(tmp_path, [path])
    assert (tmp_path / "tables" / f"{suite.name}.csv").is_file()
    assert [c for c in run_checks(tmp_path, [path]) if c.tier == "smoke" and not agrees(c)] == []
