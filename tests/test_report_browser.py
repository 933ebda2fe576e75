"""The results site in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which
``.ci/run`` installs) driven by selenium. Without them every test here is skipped, with the reason."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPORT_SUITES

from repro.cli import main
from repro.report.screenshot import chromium_flags, find_chromium


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = find_chromium(), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # named, with the driver, so that selenium never looks for a download
    for flag in chromium_flags():
        options.add_argument(flag)
    options.add_argument("--window-size=1400,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(report_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    assert main(["report", "--results", str(report_results), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _open(browser, page: Path, screenshots: Path) -> None:
    """Load ``page`` and save what the browser shows to ``screenshots``."""
    browser.get(page.resolve().as_uri())
    shot = screenshots / f"{page.parent.name}-{page.stem}.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _by_css(browser, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def test_the_index_lists_every_suite(browser, site, screenshots):
    _open(browser, site / "index.html", screenshots)
    assert sorted({link.text for link in _by_css(browser, "a.suite-link")}) == sorted(REPORT_SUITES)
    _by_css(browser, "a.suite-link")[0].click()  # a link leads to its suite's page
    assert browser.current_url.endswith(f"/suites/{REPORT_SUITES[0]}.html")
    assert _by_css(browser, "h1")[0].text.startswith(REPORT_SUITES[0])


def test_every_claim_badge_shows_repro_check_json_verdict(browser, site, report_results, screenshots, capsys):
    capsys.readouterr()
    main(["check", "--results", str(report_results), "--json"])
    expected = {f"{r['suite']}/{r['tier']}/{r['reference']}": r["status"] for r in json.loads(capsys.readouterr().out)}
    shown = {}
    for name in REPORT_SUITES:
        _open(browser, site / "suites" / f"{name}.html", screenshots)
        for row in _by_css(browser, "tr.claim"):
            (badge,) = row.find_elements("css selector", ".badge")
            assert badge.text == badge.get_attribute("data-verdict")  # what a reader sees is the verdict
            shown[row.get_attribute("data-claim")] = badge.text
    assert shown == expected and {"pass", "fail", "not run"} <= set(shown.values())


def _column(browser, table_id: str, header: str) -> list[float]:
    headers = [th.text.rstrip(" ↕▲▼") for th in _by_css(browser, f"#{table_id} thead th")]
    index = headers.index(header) + 1
    return [float(td.get_attribute("data-sort")) for td in _by_css(browser, f"#{table_id} tbody td:nth-child({index})")]


def test_clicking_a_column_header_sorts_the_table(browser, site, screenshots):
    _open(browser, site / "suites" / f"{REPORT_SUITES[0]}.html", screenshots)
    before = _column(browser, "results-table", "top1")
    assert len(before) == 2 and before != sorted(before)  # bn (80) above gn (79) in the suite's order
    (header,) = [th for th in _by_css(browser, "#results-table thead th") if th.text.startswith("top1")]
    header.click()
    assert _column(browser, "results-table", "top1") == sorted(before)
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert _column(browser, "results-table", "top1") == sorted(before, reverse=True)
    assert header.get_attribute("aria-sort") == "descending"


def test_no_page_logs_a_console_error(browser, site, report_results, screenshots, tmp_path):
    compare = tmp_path / "compare"
    assert main(["report", "--compare", str(report_results), str(report_results), "--out", str(compare)]) == 0
    pages = [site / "index.html", *sorted((site / "suites").glob("*.html")), compare / "index.html"]
    errors = []
    for page in pages:
        _open(browser, page, screenshots)
        errors += [(page.name, entry["message"]) for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        # every image (the SVG plots) loaded and has a size
        for image in _by_css(browser, "img"):
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image), (
                page.name, image.get_attribute("src"))
    assert errors == []
    assert len(list(screenshots.glob("*.png"))) >= len(pages)
