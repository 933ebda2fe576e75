"""nox sessions for repro: tests, lint, and running / gathering / checking suites.

Every session that needs torch installs the package against ``requirements.lock`` (exact versions) into a
virtualenv that can see system site-packages, so a machine that already has the multi-GB torch install reuses
it, and reuses its environment between invocations. ``lint`` installs ruff and import-linter alone.

Console scripts are never run by name: a system-wide ``pytest`` or ``repro`` script would win over the venv's
when pip considered the package already installed (system site-packages), and its interpreter may lack torch.
Every command runs as ``python -m ...`` with the session's own interpreter instead.

Only ``tests`` switches the Hugging Face hub off; the main job and the suite sessions may download a dataset
that is not on disk, and the loaders say so when they do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nox

nox.needs_version = ">=2025.02.09"
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SHARED_VENV = {"venv_params": ["--system-site-packages"], "reuse_venv": True}
# Fails unless the session's interpreter itself imports torch and this checkout's repro: the check that would
# have caught a foreign pytest script running the tests.
ENVIRONMENT_CHECK = """
import pathlib, sys, torch, repro
venv = pathlib.Path(sys.prefix).resolve()
source = pathlib.Path(repro.__file__).resolve()
assert sys.prefix != sys.base_prefix, f"not a virtualenv: {sys.prefix}"
assert source.is_relative_to(pathlib.Path.cwd().resolve()), f"repro imported from {source}, not this checkout"
print(f"environment: {sys.executable} (venv {venv}), torch {torch.__version__}, repro from {source.parent}")
"""


def _install(session: nox.Session, extra: str = "test") -> None:
    session.env["PYTHONUNBUFFERED"] = "1"
    session.run_install("python", "-m", "pip", "install", "-q", "-c", "requirements.lock", "-e", f".[{extra}]")


def _repro(session: nox.Session, *args: str, **options) -> None:
    session.run("python", "-m", "repro", *args, **options)


@nox.session(**SHARED_VENV)
def tests(session: nox.Session) -> None:
    """pytest on CPU, offline (pass pytest arguments after --)."""
    _install(session)
    session.env.update(OFFLINE)
    session.run("python", "-c", ENVIRONMENT_CHECK)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(**SHARED_VENV, default=False)
def slurm(session: nox.Session) -> None:
    """The Slurm executor against a real one-node cluster: installs slurm-wlm and munge from Debian when missing,
    starts munged, slurmctld and slurmd (``.ci/slurm-cluster``), runs tests/test_slurm_cluster.py, and stops the
    cluster even when a test fails. Needs root (it runs the daemons as root)."""
    _install(session)
    cluster = tempfile.mkdtemp(prefix="repro-slurm-")  # short: munge's socket path must fit in 108 bytes
    session.run("bash", ".ci/slurm-cluster", "start", cluster, external=True)
    try:
        session.env.update({**OFFLINE, "SLURM_CONF": f"{cluster}/slurm.conf", "REPRO_TEST_SLURM_CLUSTER": "1"})
        session.run("python", "-m", "pytest", "tests/test_slurm_cluster.py", *session.posargs)
    finally:
        session.run("bash", ".ci/slurm-cluster", "stop", cluster, external=True)


#: import-linter's ``lint-imports`` console script, run on the session's interpreter: the package has no
#: ``__main__`` (``python -m importlinter.cli`` would import the module, check nothing and exit 0)
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and this file, import-linter's contracts of pyproject.toml (the layers of the
    package, one way down) and ``mkdocs build --strict`` of docs/; installs ruff, import-linter and mkdocs alone, at
    their locked versions."""
    session.run_install("python", "-m", "pip", "install", "-q", "-c", "requirements.lock", "ruff", "import-linter",
                        "mkdocs")
    session.run("python", "-m", "ruff", "check", "repro", "tests", "benchmarks", "noxfile.py")
    session.run("python", "-c", LINT_IMPORTS, "--no-cache")
    # docs/ as a site: a broken link between its pages fails the build
    session.run("python", "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", session.create_tmp() + "/site")


@nox.session(**SHARED_VENV, default=False)
def suite(session: nox.Session) -> None:
    """Run one suite: nox -s suite -- NAME [TIER] [repro run flags]."""
    if not session.posargs:
        session.error("usage: nox -s suite -- NAME [smoke|full] [--device cuda ...]")
    name, *rest = session.posargs
    tier = rest.pop(0) if rest and not rest[0].startswith("-") else "smoke"
    _install(session)
    _repro(session, "run", name, "--tier", tier, *rest)


@nox.session(**SHARED_VENV, default=False)
def gather(session: nox.Session) -> None:
    """All run records under results/ -> tables, plots and results/README.md."""
    _install(session)
    _repro(session, "gather", *session.posargs)


@nox.session(**SHARED_VENV, default=False)
def check(session: nox.Session) -> None:
    """Compare results/ with the suites' references; fails when a check fails."""
    _install(session)
    _repro(session, "check", *session.posargs)


@nox.session(**SHARED_VENV, default=False)
def report(session: nox.Session) -> None:
    """The results site of results/ into results/site/ (``repro report``; pass its flags after --, e.g.
    ``-- --screenshot docs/report-index.png`` to refresh the README's picture of the index)."""
    _install(session)
    _repro(session, "report", "--results", "results", *session.posargs)


@nox.session(**SHARED_VENV, default=False)
def reproduce(session: nox.Session) -> None:
    """The main job: train seed 0 of the laptop tier of fmnist-baseline (ResNet-20 under bn, gn and none on the
    whole of Fashion-MNIST) and convert its BN model in qbn-fmnist into reproduced/, two runs at a time (each with
    half of the CPU threads: one each on 2 cores, as the committed records were made); gather and check those
    records, compare them with the committed ones of the same run ids, then check the committed seeds, and end
    with the results site of reproduced/ (its index's path printed last). The README gives the measured time.

    ``nox -s reproduce -- smoke`` does the same with the smoke tier of every suite (minutes; the quick check of the
    code paths). A second invocation resumes: runs with a complete record in reproduced/ are not trained again.
    """
    _install(session)
    tier = session.posargs[0] if session.posargs else "laptop"
    names = (["fmnist-baseline", "qbn-fmnist"] if tier == "laptop"
             else sorted(path.stem for path in Path("suites").glob("*.yaml")))
    fresh = "reproduced"
    # the laptop tier two runs at a time; the smoke tier one at a time, as its generated stand-in datasets are
    # written on first use by whichever run needs them
    # the laptop tier's seed 0 (its claims' verdicts rest on five seeds, which would take over 20 minutes here;
    # the committed records hold seeds 1 and 2, and `repro run NAME --tier laptop` runs them)
    workers = ["--workers", "2", "--seed", "0"] if tier == "laptop" else []
    for name in names:
        _repro(session, "run", name, "--tier", tier, "--results", fresh, "--no-progress", *workers)
    _repro(session, "gather", "--results", fresh, *names)
    # a failed claim is a finding to report, not a reason to skip the regression report that follows
    _repro(session, "check", "--results", fresh, *names, success_codes=[0, 1])
    # same seed and code: identical on the same kind of CPU; elsewhere within 1 point (provenance says what differs)
    _repro(session, "compare", "results", fresh, *names, "--tolerance", "1.0")
    if tier == "laptop":  # the verdicts over all the seeds, from the committed records the compare vouched for
        _repro(session, "check", "--results", "results", *names, success_codes=[0, 1])
    # the results site of what was reproduced; repro report ends by printing the path of its index
    _repro(session, "report", "--results", fresh, *names)


if __name__ == "__main__":
    nox.main()
