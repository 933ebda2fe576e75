"""The nox sessions run tools with the session's own interpreter and keep the hub off in tests only.

A fake session records what each session would run, so the promises of issue 9 hold without a network:
no console script is run by name (a system ``pytest`` without torch once ran the tests), ``lint`` installs
ruff and import-linter alone, and only ``tests`` switches the Hugging Face hub off.
"""

import importlib.util
from pathlib import Path

import pytest

from repro.data.hub import load_hub_split

ROOT = Path(__file__).resolve().parents[1]


class FakeSession:
    def __init__(self, posargs: list[str]) -> None:
        self.posargs = posargs
        self.env: dict[str, str] = {}
        self.installs: list[tuple[str, ...]] = []
        self.commands: list[tuple[str, ...]] = []

    def run_install(self, *args: str, **_: object) -> None:
        self.installs.append(args)

    def run(self, *args: str, **_: object) -> None:
        self.commands.append(args)

    def create_tmp(self) -> str:
        return "/tmp/nox-session-tmp"

    def error(self, message: str) -> None:
        raise AssertionError(message)


@pytest.fixture(scope="module")
def noxfile():
    pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location("repro_noxfile", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "posargs"), [("tests", []), ("lint", []), ("suite", ["fmnist-baseline"]),
                                                ("gather", []), ("check", []), ("report", []),
                                                ("reproduce", [])])
def test_every_command_runs_on_the_sessions_interpreter(noxfile, name: str, posargs: list[str]) -> None:
    session = FakeSession(posargs)
    getattr(noxfile, name).func(session)
    assert session.commands, f"{name} runs nothing"
    for command in session.installs + session.commands:
        assert command[0] == "python", f"{name} runs {command[0]!r} by name: {command}"
    offline = session.env.get("HF_HUB_OFFLINE") == "1"
    assert offline == (name == "tests"), f"{name}: the hub must be off in tests only"


def test_lint_installs_ruff_import_linter_and_mkdocs_alone(noxfile) -> None:
    session = FakeSession([])
    noxfile.lint.func(session)
    installed = [arg for command in session.installs for arg in command[command.index("install") + 1:]
                 if not arg.startswith("-") and arg != "requirements.lock"]
    assert installed == ["ruff", "import-linter", "mkdocs"]
    # the contracts are checked, by import-linter's own entry point on the session's interpreter
    assert any(command[:2] == ("python", "-c") and "importlinter" in command[2] for command in session.commands)
    # and docs/ is built with warnings (a broken link) as errors
    assert any(command[:5] == ("python", "-m", "mkdocs", "build", "--strict") for command in session.commands)


def test_the_tests_session_checks_its_interpreter_first(noxfile) -> None:
    session = FakeSession([])
    noxfile.tests.func(session)
    check, pytest_run = session.commands[0], session.commands[-1]
    assert check[:2] == ("python", "-c") and "import" in check[2] and "torch" in check[2]
    assert pytest_run[:3] == ("python", "-m", "pytest")
    # the check itself passes in this interpreter, which imports torch and this checkout's repro
    exec(compile(check[2], "environment check", "exec"), {})


def test_the_main_job_ends_with_the_results_site_of_what_it_reproduced(noxfile) -> None:
    session = FakeSession([])
    noxfile.reproduce.func(session)
    assert session.commands[-1][:6] == ("python", "-m", "repro", "report", "--results", "reproduced")


def test_the_report_session_builds_the_site_of_results_and_passes_its_flags(noxfile) -> None:
    session = FakeSession(["--screenshot", "docs/report-index.png"])
    noxfile.report.func(session)
    assert session.commands == [("python", "-m", "repro", "report", "--results", "results", "--screenshot",
                                 "docs/report-index.png")]


def test_reaching_the_hub_is_announced(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception):  # noqa: B017 - offline here: whatever datasets raises, the line came first
        load_hub_split("zalando-datasets/fashion_mnist", "train", "image", "label")
    assert "from the Hugging Face hub" in capsys.readouterr().err


def test_the_slurm_session_stops_its_cluster_when_a_test_fails(noxfile) -> None:
    class FailingTests(FakeSession):
        def run(self, *args: str, **options: object) -> None:
            super().run(*args, **options)
            if args[:3] == ("python", "-m", "pytest"):
                raise RuntimeError("a test failed")

    session = FailingTests([])
    with pytest.raises(RuntimeError, match="a test failed"):
        noxfile.slurm.func(session)
    (start, tests, stop) = session.commands
    assert start[:3] == ("bash", ".ci/slurm-cluster", "start") and stop[:3] == ("bash", ".ci/slurm-cluster", "stop")
    assert start[3] == stop[3] and session.env["SLURM_CONF"] == f"{start[3]}/slurm.conf"
    assert tests[:4] == ("python", "-m", "pytest", "tests/test_slurm_cluster.py")
    assert session.env["REPRO_TEST_SLURM_CLUSTER"] == "1"
