"""``repro report`` and ``repro check --json`` on a results folder the tests write (conftest's REPORT_SUITES):
the site's pages, its verdicts against the check's, its self-containment, --out's guard, the compare page."""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPORT_SUITES

from repro.cli import main
from repro.results.check import STATUSES


def _check_json(results: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[dict]]:
    capsys.readouterr()
    code = main(["check", "--results", str(results), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def _report(results: Path, out: Path, *args: str) -> int:
    return main(["report", "--results", str(results), "--out", str(out), *args])


def site_verdicts(site: Path) -> dict[str, str]:
    """suite/tier/reference -> the verdict its badge shows, read from the suite pages' HTML."""
    found = {}
    for page in (site / "suites").glob("*.html"):
        for claim, verdict in re.findall(r'<tr class="claim" data-claim="([^"]+)">.*?data-verdict="([^"]+)"',
                                         page.read_text(), flags=re.S):
            found[claim] = verdict
    return found


def test_check_json_lists_every_reference_and_tier_with_its_verdict(report_results, capsys):
    code, results = _check_json(report_results, capsys)
    capsys.readouterr()
    assert code == main(["check", "--results", str(report_results)])  # the same exit status as the report
    # per suite: 2 tiers of gn-close-to-bn, gn-far-above-bn and bn-top1 on smoke
    assert sorted((r["suite"], r["tier"], r["reference"]) for r in results) == sorted(
        (suite, tier, ref) for suite in REPORT_SUITES for tier, ref in (
            ("smoke", "gn-close-to-bn"), ("full", "gn-close-to-bn"), ("smoke", "gn-far-above-bn"),
            ("smoke", "bn-top1")))
    by_ref = {(r["tier"], r["reference"]): r for r in results if r["suite"] == REPORT_SUITES[0]}
    # gn − bn per seed: −2, −2, +1 (conftest's REPORT_TOP1): mean −1, SE 1, 95% t-interval −1 ± 4.30
    assert by_ref["smoke", "gn-close-to-bn"]["status"] == "pass"
    assert by_ref["smoke", "gn-close-to-bn"]["reproduced"] == pytest.approx(-1.0)
    assert by_ref["smoke", "gn-close-to-bn"]["se"] == pytest.approx(1.0)
    assert by_ref["smoke", "gn-far-above-bn"]["status"] == "fail"
    assert by_ref["full", "gn-close-to-bn"]["status"] == "not run"
    assert by_ref["full", "gn-close-to-bn"]["se"] is None


def test_report_writes_an_index_and_a_page_per_suite_whose_verdicts_are_the_checks(report_results, tmp_path,
                                                                                      capsys):
    site = tmp_path / "site"
    assert _report(report_results, site) == 0
    assert f"open {(site / 'index.html').resolve()}" in capsys.readouterr().out
    index = (site / "index.html").read_text()
    for name in REPORT_SUITES:
        assert f'href="suites/{name}.html"' in index and (site / "suites" / f"{name}.html").is_file()
    _, results = _check_json(report_results, capsys)
    assert site_verdicts(site) == {f"{r['suite']}/{r['tier']}/{r['reference']}": r["status"] for r in results}
    page = (site / "suites" / f"{REPORT_SUITES[0]}.html").read_text()
    for section in ("claims", "results", "plots", "references", "suite-file", "provenance"):
        assert f'id="{section}"' in page
    assert "Test CPU (cpu, 1 thread, fp32 on cpu)" in index and "torch 2.15.0, timm 1.0.31" in index
    assert "gn within 50 points of bn" in page and "top1-per-seed" in page
    plots = sorted(path.name for path in (site / "plots").iterdir())
    assert plots == sorted(f"{name}.{plot}.smoke.svg" for name in REPORT_SUITES for plot in ("forest", "top1-per-seed"))


def test_the_site_loads_nothing_from_a_network(report_results, tmp_path):
    site = tmp_path / "site"
    assert _report(report_results, site) == 0
    for page in site.rglob("*.html"):
        for target in re.findall(r'(?:src|href)="([^"]*)"', page.read_text()):
            assert "://" not in target and not target.startswith("//"), (page, target)
            if not target.startswith(("#", "data:")):
                assert (page.parent / target.split("#")[0]).is_file(), (page, target)
    for style in site.rglob("*.css"):
        assert "url(" not in style.read_text() and "@import" not in style.read_text()


def test_a_badge_color_for_every_verdict(report_results, tmp_path):
    site = tmp_path / "site"
    assert _report(report_results, site) == 0
    index = (site / "index.html").read_text()
    for status in STATUSES:
        assert re.search(rf"\.verdict-{status.replace(' ', '-')} {{ background: #[0-9a-f]{{6}}; }}", index)


def test_out_must_be_new_empty_or_an_earlier_site(report_results, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert _report(report_results, precious) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "repro report did not write" in err
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]

    site = tmp_path / "site"
    assert _report(report_results, site) == 0
    (site / "left-over.html").write_text("from an earlier build")
    assert _report(report_results, site, REPORT_SUITES[0]) == 0  # replaced whole
    assert not (site / "left-over.html").exists()
    assert sorted(p.name for p in (site / "suites").iterdir()) == [f"{REPORT_SUITES[0]}.html"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_results_folder_without_records_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for results in (tmp_path / "empty", tmp_path / "missing"):
        assert _report(results, tmp_path / "site") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--results {results}" in err
    assert not (tmp_path / "site").exists()


def test_judging_options_without_compare_are_one_line_and_exit_2(report_results, tmp_path, capsys):
    for option, value in (("--tolerance", "1"), ("--match", "setting"), ("--confidence", "0.9")):
        assert main(["report", "--results", str(report_results), "--out", str(tmp_path / "site"), option,
                     value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and "--compare" in err
    assert not (tmp_path / "site").exists()


def test_compare_page_highlights_the_settings_that_moved(report_results, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(report_results, moved)
    for record_file in (moved / "runs" / REPORT_SUITES[0]).glob("*.json"):
        record = json.loads(record_file.read_text())
        if record["setting"]["normalizer"] == "bn":  # bn's three seeds each 7 points up: an interval of [7, 7]
            record["metrics"]["top1"] += 7.0
            record_file.write_text(json.dumps(record))
            moved_setting = record["setting"]
    out = tmp_path / "compare"
    assert main(["report", "--compare", str(report_results), str(moved), "--out", str(out)]) == 0
    assert "verdict: differs" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert '<b id="verdict">differs</b>' in page
    rows = re.findall(r'<tr class="(moved-[a-z]+)">\s*<td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>top1</td>',
                      page)
    setting = " ".join(f"{k}={v}" for k, v in moved_setting.items() if k != "seed")
    assert [(css, suite, tier, text.strip()) for css, suite, tier, text in rows] == [
        ("moved-differs", REPORT_SUITES[0], "smoke", setting)]


@pytest.mark.slow
def test_every_verdict_on_the_site_of_the_committed_results_is_repro_check_json(tmp_path, capsys, monkeypatch):
    """Today's results/ (its records, copied: check writes checks/ beside them), every suite and tier."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("REPRO_SUITES_DIR", str(root / "suites"))  # not the module's small suites
    results = tmp_path / "results"
    shutil.copytree(root / "results" / "runs", results / "runs")
    assert _report(results, tmp_path / "site") == 0
    _, checked = _check_json(results, capsys)
    assert len(checked) > 0
    assert site_verdicts(tmp_path / "site") == {f"{r['suite']}/{r['tier']}/{r['reference']}": r["status"]
                                               for r in checked}
