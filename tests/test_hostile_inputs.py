"""Promises about hostile, damaged or mistaken input: refused in one line that names the file (and the field),
exit status 2, nothing written, no traceback. One test per defect found by trying repro as a new user would."""

import argparse
import gzip
import io
import json
import math
import os
import pickle
import resource
import socket
import tarfile
import time
from pathlib import Path

import pytest
import torch

from repro.cli import main
from repro.data import load_dataset
from repro.data.generated import write_cifar, write_fashion_mnist
from repro.data.idx import write_idx
from repro.errors import UserError
from repro.results.compare import compare
from tests.test_compare import record as compare_record
from tests.test_compare import write as write_records


def _edit(suites_dir: Path, old: str, new: str) -> Path:
    path = suites_dir / "tiny.yaml"
    text = path.read_text()
    assert old in text, "the test's edit must apply"
    path.write_text(text.replace(old, new, 1))
    return path


def _one_line_error(capsys: pytest.CaptureFixture, *expected: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err[:2000]
    for part in expected:
        assert part in err
    return err


# --- hostile suite files ---------------------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_quickly_in_one_short_line(suites_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Nine levels of aliases, each ten times the one before: 10^9 strings if expanded."""
    assert main(["run", "tiny", "--tier", "nope"]) == 2  # imports everything once, so what follows is parsing alone
    capsys.readouterr()
    levels = ['a0: &a0 "xxxxxxxxxx"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = "\n".join(f"  {line}" for line in levels)
    path = _edit(suites_dir, "description: a tiny suite for tests", f"description:\n{bomb}\n  x: *a8")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    assert main(["run", str(path), "--results", str(tmp_path / "r")]) == 2
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no expansion happened
    err = _one_line_error(capsys, str(path), "aliases")
    assert len(err) < 300


def test_oversized_suite_file_is_refused(suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = _edit(suites_dir, "citation: none", "citation: none\n" + "# padding\n" * 200_000)
    assert main(["list"]) == 2
    _one_line_error(capsys, str(path), "bytes")


@pytest.mark.parametrize("command", ["run", "list", "gather"])
def test_non_utf8_suite_is_a_user_error(command: str, suites_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    path = suites_dir / "tiny.yaml"
    path.write_bytes(path.read_bytes().replace(b"a tiny suite", b"a tiny \xff\xfe suite"))
    results = tmp_path / "results"
    (results / "runs" / "tiny").mkdir(parents=True)
    argv = {"run": ["run", "tiny", "--results", str(results)], "list": ["list"],
            "gather": ["gather", "--results", str(results)]}[command]
    assert main(argv) == 2
    _one_line_error(capsys, str(path), "not UTF-8")


def test_duplicate_keys_are_refused(suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = _edit(suites_dir, "seeds: [0]", "seeds: [0]\nseeds: [1]")
    assert main(["run", str(path)]) == 2
    _one_line_error(capsys, str(path), "duplicate key 'seeds'", "line")


def test_suite_name_must_be_a_slug(suites_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``...yaml`` has the stem ``..``: its records would have gone to runs/../, outside runs/<suite>/."""
    path = suites_dir / "...yaml"
    path.write_text((suites_dir / "tiny.yaml").read_text().replace("name: tiny", "name: ..", 1))
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 2
    _one_line_error(capsys, str(path), "field name")
    assert not (tmp_path / "results").exists()


# --- validation holes -------------------------------------------------------------------------------------------

CASES = {
    "unknown model grid key": ("tiers:", "grid: {model.small_inptu: [true, false]}\ntiers:",
                               "field grid.model.small_inptu: unknown model field 'small_inptu'; allowed: small_input"),
    "unknown linked train key": ("tiers:", "grid: {train.micro_batch: [8, 16]}\n"
                                 "linked: {train.micro_batch: {8: {train.lr_x: 0.1}, 16: {train.lr: 0.2}}}\ntiers:",
                                 "field linked.train.micro_batch.8.train.lr_x: unknown train field 'lr_x'"),
    "unknown linked model key": ("tiers:", "grid: {train.micro_batch: [8, 16]}\n"
                                 "linked: {train.micro_batch: {8: {model.pretraind: x}, 16: {train.lr: 0.2}}}\ntiers:",
                                 "unknown model field 'pretraind'"),
    "bad task grid value": ("tiers:", "grid: {task.save_checkpoint: [true, maybe]}\ntiers:",
                            "field task_options.save_checkpoint (task.save_checkpoint=maybe)"),
    "unknown key inside a tier": ("  smoke: {}", "  smoke: {epochz: 2}",
                                  "field tiers.smoke.epochz: unknown key; allowed: description, epochs,"),
    "unknown key inside a reference": ("    min: -50", "    min: -50\n    maxx: 3",
                                       "field references.0.relative.maxx: unknown key; allowed: kind, id, claim,"),
    "empty tier seeds": ("  smoke: {}", "  smoke: {seeds: []}", "field tiers.smoke.seeds"),
    "exclude matching nothing": ("tiers:", "exclude: [{normalizer: gn32}]\ntiers:",
                                 "field exclude.0: {'normalizer': 'gn32'} matches no setting"),
    "reference matching nothing": ("a: {normalizer: gn}", "a: {normalizer: gn32}",
                                   "field references.0: gn-vs-bn: setting {'normalizer': 'gn32'} matches no run"),
    "plot on an unknown axis": ("tiers:", "plots: [{name: p, x: train.lr, y: top1, line: normalizer}]\ntiers:",
                                "field plots.0.x: unknown column 'train.lr'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_hole_is_a_one_line_user_error(case: str, suites_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    old, new, expected = CASES[case]
    path = _edit(suites_dir, old, new)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    _one_line_error(capsys, f"repro: error: {path}: ", expected)
    assert not results.exists()


# --- damaged or hostile data -------------------------------------------------------------------------------------

class _Exploit:
    def __reduce__(self):
        return (Path("pwned").touch, ())


def test_crafted_cifar_batch_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": [0]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"data_batch_1: not a CIFAR python batch .*refused global"):
        load_dataset("cifar10", data_dir=tmp_path, source="local")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file_names_the_file(tmp_path: Path, gz: bool) -> None:
    write_fashion_mnist(tmp_path, train=40, test=20, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    if gz:
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw)[:-40])  # a download cut short
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"{name}: .*(truncated|unreadable)"):
        load_dataset("fashion_mnist", data_dir=tmp_path, source="local")


def test_missing_data_dir_never_falls_back(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--data-dir .*/nonexistent: no such folder"):
        load_dataset("fashion_mnist", data_dir=tmp_path / "nonexistent")


# --- help true to the tool -------------------------------------------------------------------------------------

def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from repro.cli import _parser

    (sub,) = (action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_argument_of_every_subcommand_has_help() -> None:
    undocumented = [f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
                    for name, parser in _subcommands().items() for action in parser._actions
                    if not isinstance(action, argparse._HelpAction) and not action.help]
    assert undocumented == []


@pytest.mark.parametrize("command", ["run", "status", "campaign"])
def test_tier_help_sends_to_the_suites_tiers(command: str) -> None:
    """Tiers come from the suites (fmnist-baseline has smoke, full and laptop), not from a fixed pair."""
    (tier,) = (a for a in _subcommands()[command]._actions if "--tier" in a.option_strings)
    assert "smoke or full" not in tier.help and "repro list" in tier.help


@pytest.mark.parametrize("flag", [["--json"], ["--plan-device", "h200"]])
def test_campaign_plan_flags_without_plan_are_refused(flag: list[str], suites_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    assert main(["campaign", "tiny", "--tier", "smoke", "--budget", "1s", "--results", str(results), *flag]) == 2
    _one_line_error(capsys, f"{flag[0]}: applies to --plan")
    assert not results.exists()


@pytest.mark.parametrize("flag", [["--partition", "gpu"], ["--mem", "64"], ["--sbatch-option", "account=lab"],
                                  ["--cluster", "cluster.yaml"]])
def test_slurm_flags_are_refused_where_runs_are_local(flag: list[str], suites_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The help says these are slurm's: under the local executor they would be ignored in silence."""
    results = tmp_path / "results"
    assert main(["run", "tiny", "--results", str(results), *flag]) == 2
    _one_line_error(capsys, f"{flag[0]}: applies to --executor slurm")
    assert not results.exists()


def _offline_wheels(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip download stands in: one wheel, no network."""
    def download(target: Path, *_) -> list[Path]:
        target.mkdir(parents=True, exist_ok=True)
        (target / "pydantic-2.0-py3-none-any.whl").write_bytes(b"wheel")
        return sorted(target.glob("*.whl"))

    monkeypatch.setattr("repro.execute.bundle.download_wheels", download)


def test_bundle_dataset_names_what_it_can_carry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    _offline_wheels(monkeypatch)
    assert main(["bundle", str(tmp_path / "out"), "--dataset", "cifar10"]) == 2
    _one_line_error(capsys, "--dataset cifar10", "allowed: fashion_mnist")
    assert not (tmp_path / "out").exists()


# --- repro compare: B lost information ---------------------------------------------------------------------------

def _lost(kind: str) -> dict:
    full = compare_record("r1", 1, 92.0)
    return {"no metrics": {**full, "metrics": {}},
            "a metric as text": {**full, "metrics": {**full["metrics"], "top1": "92.0"}},
            "ok to failed": {**full, "status": "failed", "metrics": {}},
            "broken JSON": full}[kind]


@pytest.mark.parametrize("kind", ["no metrics", "a metric as text", "ok to failed", "broken JSON"])
def test_compare_differs_when_b_lost_information(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = write_records(tmp_path / "a", compare_record("r0", 0, 91.0), compare_record("r1", 1, 92.0))
    b = write_records(tmp_path / "b", compare_record("r0", 0, 91.0), _lost(kind))
    if kind == "broken JSON":
        (b / "runs" / "s" / "r1.json").write_text('{"schema": 1, "suite": "s", "run_id": "r1", "sta')
    assert compare(a, b).verdict == "differs"
    assert main(["compare", str(a), str(b)]) == 1
    assert "**Verdict: differs**" in capsys.readouterr().out


def test_compare_infinite_on_both_sides_agrees(tmp_path: Path) -> None:
    """inf - inf is nan: an unbounded metric (a ratio over 0 s) the same on both sides must not differ."""
    row = {"method": "source", "batch_size": 8, "error": 40.0, "speedup": math.inf}
    a = write_records(tmp_path / "a", compare_record("r0", 0, 91.0, rows=[row]))
    b = write_records(tmp_path / "b", compare_record("r0", 0, 91.0, rows=[row]))
    assert compare(a, b).verdict == "identical"


# --- repro unpack --------------------------------------------------------------------------------------------------

def _tar_gz(path: Path, members: dict[str, bytes], declared: dict[str, int] | None = None) -> Path:
    """A .tar.gz of ``members``; a name in ``declared`` gets a header that declares that size, however short its
    data (a header is all it takes to claim 300 MB)."""
    buffer = io.BytesIO()
    for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = (declared or {}).get(name, len(data))
        buffer.write(info.tobuf(format=tarfile.GNU_FORMAT))
        buffer.write(data + b"\0" * (-len(data) % 512))
    buffer.write(b"\0" * 1024)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


def _tiny_record(**changes: object) -> tuple[str, bytes]:
    """A complete record of the tiny suite's first run (``changes`` applied to it and its config), as an archive
    member: its name and its bytes. Its id is recomputed, so only what ``changes`` says is wrong."""
    from repro.suite import expand, load_suite
    from repro.suite.expand import run_id_of

    run = expand(load_suite("tiny")[0], "smoke")[0]
    config = {**run.config, **changes.pop("config", {})}
    record = {"schema": 1, "suite": config["suite"], "suite_version": 1, "run_id": run_id_of(config), "status": "ok",
              "tier": "smoke", "setting": run.setting, "config": config, "metrics": {"top1": 50.0}, **changes}
    return f"runs/{record['suite']}/{record['run_id']}.json", json.dumps(record).encode()


@pytest.mark.parametrize(("member", "size"), [("runs/tiny/0123456789abcdef.json", 300 * 2**20),
                                              ("campaign.log", 300 * 2**20),
                                              ("runs/tiny/0123456789abcdef.json", 50 * 10**9)])
def test_unpack_refuses_a_member_declaring_a_huge_size(member: str, size: int, suites_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    archive = _tar_gz(tmp_path / "window.tar.gz", {member: b"{}"}, declared={member: size})
    results = tmp_path / "results"
    assert main(["unpack", str(archive), "--results", str(results)]) == 2
    _one_line_error(capsys, str(archive), member, f"declares {size} bytes")
    assert not results.exists()


def test_unpack_stops_at_its_total_and_archive_sizes(suites_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Members each within the member limit, together past the total (scaled down: 64 KiB for 256 MiB)."""
    from repro.execute import archive as archive_module

    monkeypatch.setattr(archive_module, "MAX_UNPACKED_BYTES", 64 * 2**10)
    archive = _tar_gz(tmp_path / "window.tar.gz", {f"tables/t{i}.csv": b"0" * 30_000 for i in range(3)})
    assert main(["unpack", str(archive), "--results", str(tmp_path / "results")]) == 2
    _one_line_error(capsys, str(archive), "more than")
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_BYTES", 100)
    assert main(["unpack", str(archive), "--results", str(tmp_path / "results")]) == 2
    _one_line_error(capsys, str(archive), "bytes")
    assert not (tmp_path / "results").exists()


def test_a_truncated_archive_writes_nothing(suites_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name, data = _tiny_record()
    archive = _tar_gz(tmp_path / "window.tar.gz", {name: data, "tables/t.csv": bytes(range(256)) * 400})
    archive.write_bytes(archive.read_bytes()[:-200])  # a download cut short, after the record
    assert main(["unpack", str(archive), "--results", str(tmp_path / "results")]) == 2
    _one_line_error(capsys, str(archive))
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("changes", "problem"), [
    ({"config": {"suite": "ghost"}}, "suite 'ghost' has no suite file"),
    ({"setting": {"backbone": "test_resnet", "normalizer": "gn", "seed": 0}},
     "setting normalizer='gn' contradicts its config ('bn')"),
    ({"tier": "full"}, "field tier 'full' contradicts its config ('smoke')"),
])
def test_unpack_refuses_records_gather_could_not_use(changes: dict, problem: str, suites_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    good, bad = _tiny_record(), _tiny_record(**changes)
    results = tmp_path / "results"
    members = dict([bad]) if good[0] == bad[0] else dict([good, bad])
    assert main(["unpack", str(_tar_gz(tmp_path / "w.tar.gz", members)), "--results", str(results)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and problem in captured.err, captured.err
    assert main(["gather", "--results", str(results)]) == 0, "what unpack merged, gather can read"


def test_unpack_escapes_member_names(suites_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name = "runs/tiny/\x1b[2K\rrepro: 5 records added\nx.json"
    archive = _tar_gz(tmp_path / "w.tar.gz", {name: b"{}"})
    assert main(["unpack", str(archive), "--results", str(tmp_path / "results")]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "\x1b" not in captured.err and "\r" not in captured.err
    assert "\\x1b[2K\\rrepro: 5 records added\\nx.json" in captured.err


def test_two_archives_with_one_log_name_keep_both_logs(suites_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    for window, text in (("a", b"window a\n"), ("b", b"window b\n"), ("a", b"window a\n")):
        (tmp_path / window).mkdir(exist_ok=True)
        archive = _tar_gz(tmp_path / window / "window.tar.gz", {"campaign.log": text})
        assert main(["unpack", str(archive), "--results", str(results)]) == 0
    logs = sorted((results / "campaign-logs").iterdir())
    assert [p.name for p in logs] == ["window-2.log", "window.log"], "unpacking a again adds no third copy"
    assert {p.read_bytes() for p in logs} == {b"window a\n", b"window b\n"}


@pytest.mark.parametrize("command", ["unpack", "campaign"])
def test_results_that_is_a_file_is_one_line(command: str, suites_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _quick_runs(monkeypatch)
    results = tmp_path / "results"
    results.write_text("a file")
    argv = {"unpack": ["unpack", str(_tar_gz(tmp_path / "w.tar.gz", dict([_tiny_record()])))],
            "campaign": ["campaign", "tiny", "--tier", "smoke", "--budget", "5m", "--device", "cpu"]}[command]
    assert main([*argv, "--results", str(results)]) == 2
    _one_line_error(capsys, "--results", str(results))


# --- repro campaign: checked before the first run ----------------------------------------------------------------

def _quick_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Training returns at once: these tests are about what happens around runs."""
    from repro.tasks.base import RunOutcome
    from repro.tasks.train import TrainTask

    ran: list[str] = []

    def quick(self, run, ctx):
        ran.append(run.run_id)
        return RunOutcome("ok", {"top1": 50.0, "loss": 1.0}, 0.01)

    monkeypatch.setattr(TrainTask, "run", quick)
    return ran


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_campaign_archive_path_is_checked_before_the_first_run(where: str, suites_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    ran = _quick_runs(monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    archive = {"a folder": tmp_path / "out", "under a file": tmp_path / "notes.txt" / "w.tar.gz"}[where]
    results = tmp_path / "results"
    assert main(["campaign", "tiny", "--tier", "smoke", "--budget", "5m", "--device", "cpu", "--results",
                 str(results), "--archive", str(archive)]) == 2
    _one_line_error(capsys, f"--archive {archive}")
    assert ran == [] and not (results / "runs").exists()
    assert not list(tmp_path.glob(".out.*")) and not list((tmp_path / "out").iterdir()), "no temporary file left"


@pytest.mark.parametrize("budget", ["0s", "0"])
def test_campaign_refuses_a_budget_of_nothing(budget: str, suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["campaign", "tiny", "--budget", budget, "--plan"]) == 2
    _one_line_error(capsys, f"--budget {budget!r}", "more than 0")


# --- Slurm: one line per sbatch option ---------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "cluster", "message", "why"), [
    (["--sbatch-option", "account=lab\n#SBATCH --exclusive"], "", "--sbatch-option: ", "control character"),
    (["--sbatch-option", "acc\nount=lab"], "", "--sbatch-option: ", "control character"),
    (["--partition", "gpu\nrm -rf ~"], "", "--partition: ", "control character"),
    ([], "  sbatch_options: {qos: \"high\\ntouch /tmp/x\"}\n", "field cluster.sbatch_options", "control character"),
    ([], "  sbatch_options: {\"qos\\n\": high}\n", "field cluster.sbatch_options", "control character"),
    ([], "  partition: \"gpu\\rx\"\n", "field cluster.partition", "control character"),
    # values that Slurm would misread: --mem=infGB, --nodelist=False
    (["--mem", "inf"], "", "--mem: ", ""),
    (["--mem", "nan"], "", "--mem: ", ""),
    ([], "  sbatch_options: {nodelist: false}\n", "field cluster.sbatch_options", ""),
])
def test_sbatch_values_that_would_break_or_be_misread_in_the_script_are_refused(
        flags: list[str], cluster: str, message: str, why: str, suites_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster:\n  scheduler: slurm\n" + cluster)
    code = main(["run", "tiny", "--executor", "slurm", "--dry-run", "--cluster", str(path), "--results",
                 str(tmp_path / "results"), *flags])
    assert code == 2
    _one_line_error(capsys, message, *([why] if why else []))


def test_a_results_path_with_a_newline_is_refused_for_slurm(suites_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "r\n#SBATCH --exclusive"
    assert main(["run", "tiny", "--executor", "slurm", "--dry-run", "--results", str(results)]) == 2
    _one_line_error(capsys, "--results", "control character")


# --- run locks -----------------------------------------------------------------------------------------------------

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def _locked_run(suites_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The results folder and the lock file of the tiny suite's first run."""
    from repro.store.records import lock_path, record_path
    from repro.suite import expand, load_suite

    results = tmp_path / "results"
    run = expand(load_suite("tiny")[0], "smoke")[0]
    lock = lock_path(record_path(results, "tiny", run.run_id))
    lock.parent.mkdir(parents=True)
    return results, lock


needs_proc = pytest.mark.skipif(not BOOT_ID.exists(), reason="process start times and boot ids come from /proc")


@needs_proc
@pytest.mark.parametrize("owner", ["pid 1, another start", "a live pid of an earlier boot", "a huge pid"])
def test_a_lock_of_a_process_that_no_longer_runs_is_taken_over(owner: str, suites_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    results, lock = _locked_run(suites_dir, tmp_path)
    host, boot = socket.gethostname(), BOOT_ID.read_text().strip()
    lock.write_text({"pid 1, another start": f"1 {host} {_start_ticks(1) + 1} {boot}\n",
                     "a live pid of an earlier boot": f"{os.getppid()} {host} {_start_ticks(os.getppid())} "
                                                      "00000000-0000-0000-0000-000000000000\n",
                     "a huge pid": f"99999999999999999999 {host}\n"}[owner])
    ran = _quick_runs(monkeypatch)
    assert main(["run", "tiny", "--results", str(results), "--no-progress"]) == 0
    assert len(ran) == 2 and not lock.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{lock}: stale lock" in err and "taken over" in err, err


@needs_proc
@pytest.mark.parametrize("owner", ["this host, live", "another host"])
def test_a_held_lock_is_named_with_how_to_remove_it_and_exits_1(owner: str, suites_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    results, lock = _locked_run(suites_dir, tmp_path)
    parent, boot = os.getppid(), BOOT_ID.read_text().strip()
    host = {"this host, live": socket.gethostname(), "another host": "node17.cluster"}[owner]
    lock.write_text(f"{parent} {host} {_start_ticks(parent)} {boot}\n")
    ran = _quick_runs(monkeypatch)
    assert main(["run", "tiny", "--results", str(results), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert len(ran) == 1 and lock.exists(), "the other run goes on; the lock is left alone"
    assert f"rm {lock}" in out and f"process {parent}" in out and "1 locked" in out, out


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_lock_that_is_not_a_file_is_named_and_never_read(kind: str, suites_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    results, lock = _locked_run(suites_dir, tmp_path)
    if kind == "fifo":
        os.mkfifo(lock)  # reading it would wait for a writer forever
    else:
        lock.mkdir()
        os.utime(lock, (0, 0))  # older than a minute: once taken for a stale lock and unlinked
    ran = _quick_runs(monkeypatch)
    assert main(["run", "tiny", "--results", str(results), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert len(ran) == 1 and "Traceback" not in captured.err
    assert f"{lock}: the run's lock is not a regular file" in captured.out and f"rm -r {lock}" in captured.out


# --- repro bundle ------------------------------------------------------------------------------------------------

def test_bundle_into_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    _offline_wheels(monkeypatch)
    out = tmp_path / "bundle"
    out.write_text("a file")
    assert main(["bundle", str(out)]) == 2
    _one_line_error(capsys, str(out), "a file")


def test_bundle_never_merges_with_a_folder_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A stray wheel would be listed in source.json and installed on the box by the printed command."""
    _offline_wheels(monkeypatch)
    write_fashion_mnist(tmp_path / "data", train=40, test=20)
    out = tmp_path / "bundle"
    (out / "wheels").mkdir(parents=True)
    (out / "wheels" / "stray-0.1-py3-none-any.whl").write_bytes(b"not ours")
    assert main(["bundle", str(out), "--data-dir", str(tmp_path / "data")]) == 2
    _one_line_error(capsys, str(out), "not empty")
    assert sorted(p.name for p in out.rglob("*")) == ["stray-0.1-py3-none-any.whl", "wheels"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()  # an empty folder is fine
    assert main(["bundle", str(fresh), "--data-dir", str(tmp_path / "data")]) == 0
    assert json.loads((fresh / "source.json").read_text())["wheels"] == ["pydantic-2.0-py3-none-any.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "data", "fresh"], "no temporary folder left"


def test_bundle_checks_the_data_it_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    _offline_wheels(monkeypatch)
    data = write_fashion_mnist(tmp_path / "data", train=40, test=20, gz=False)
    images = data / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    assert main(["bundle", str(tmp_path / "bundle"), "--data-dir", str(data)]) == 2
    _one_line_error(capsys, str(images), "truncated")
    assert not (tmp_path / "bundle").exists()


# --- Fashion-MNIST copies --------------------------------------------------------------------------------------------

def test_idx_labels_that_do_not_match_the_images_name_the_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, train=40, test=20, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte: 10 labels for the 40 images of "):
        load_dataset("fashion_mnist", data_dir=tmp_path, source="local")


def test_a_data_dir_missing_one_file_says_where_the_data_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from repro.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", write_fashion_mnist(tmp_path / "debian", train=40, test=20))
    partial = write_fashion_mnist(tmp_path / "mine", train=40, test=20)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("REPRO_DATA_DIR", str(partial))
    dataset = load_dataset("fashion_mnist")
    assert dataset.source == str(tmp_path / "debian")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(partial) in err and "t10k-labels-idx1-ubyte" in err
    assert str(tmp_path / "debian") in err
