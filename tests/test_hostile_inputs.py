"""Promises about hostile, damaged or mistaken input: refused in one line that names the file (and the field),
exit status 2, nothing written, no traceback. One test per defect found by trying repro as a new user would."""

import gzip
import pickle
import resource
import time
from pathlib import Path

import pytest

from repro.cli import main
from repro.data import load_dataset
from repro.data.generated import write_cifar, write_fashion_mnist
from repro.errors import UserError


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
    "unknown key inside a reference": ("    min: -100", "    min: -100\n    maxx: 3",
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

