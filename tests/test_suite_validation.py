"""Bad suite input gives one line naming the file and the field, exit status 2, no traceback, nothing written."""

from pathlib import Path

import pytest

from repro.cli import main
from repro.suite import expand, load_suite
from repro.suite.expand import run_id_of
from repro.suite.schema import Suite
from repro.train import TrainConfig

CASES = {
    "unknown top-level key": ("seeds: [0]", "seeds: [0]\nsheeds: [1]", "field sheeds: unknown key; allowed: name,"),
    "unknown normalizer": ("normalizers: [bn,", "normalizers: [bn9,", "unknown normalizer 'bn9'; allowed:"),
    "unknown backbone": ("backbones: [test_resnet]", "backbones: [resnet_nope]", "unknown backbone 'resnet_nope'"),
    "wrong type": ("epochs: 1,", "epochs: many,", "field train.epochs: Input should be a valid integer"),
    "out of range": ("lr: 0.05", "lr: -1", "field train.lr: Input should be greater than 0"),
    "unknown train key": ("lr: 0.05", "lr: 0.05, lr_decay: 3", "field train.lr_decay: unknown key; allowed: epochs,"),
    "unknown normalizer option": ("{group_size: 8}", "{group_sise: 8}", "field normalizers.1.options: normalizer 'gn'"),
    "unknown dataset": ("name: fashion_mnist", "name: mnist2", "unknown dataset 'mnist2'; allowed:"),
    "reference column": ("a: {normalizer: gn}", "a: {norm: gn}", "field references.0: unknown setting column 'norm'"),
    "missing tier": ("  full: {}\n", "", "tiers must define smoke and full (missing: full)"),
    "micro-batch not dividing": ("lr: 0.05", "lr: 0.05, micro_batch: 5", "not a multiple of micro_batch 5"),
    "tier option of unknown normalizer": ("  smoke: {}", "  smoke: {normalizer_options: {ln: {}}}",
                                          "unknown normalizer 'ln'; allowed: bn, gn"),
    "tier runs an unknown normalizer": ("  smoke: {}", "  smoke: {normalizers: [ln]}",
                                        "tiers.smoke.normalizers: unknown normalizer 'ln'; allowed: bn, gn"),
    "tier train of unknown normalizer": ("  smoke: {}", "  smoke: {normalizer_train: {ln: {amp_cpu: true}}}",
                                         "tiers.smoke.normalizer_train: unknown normalizer 'ln'; allowed: bn, gn"),
    "unknown key in a normalizer's train": ("  smoke: {}", "  smoke: {normalizer_train: {gn: {amp_gpu: true}}}",
                                            "field tiers.smoke.normalizer_train.gn: unknown key amp_gpu; allowed:"),
    "tier minutes not positive": ("  smoke: {}", "  smoke: {expected_minutes: 0}",
                                  "field tiers.smoke.expected_minutes: Input should be greater than 0"),
    "bad tier normalizer option": ("  smoke: {}", "  smoke: {normalizer_options: {gn: {groupz: 8}}}",
                                   "field tiers.smoke.normalizer_options.gn:"),
    "linked to a non-grid key": ("tiers:", "linked: {train.lr: {0.05: {train.epochs: 2}}}\ntiers:",
                                 "linked.train.lr: not a grid key"),
    "linked value missing": ("tiers:", "grid: {train.micro_batch: [4, 8]}\n"
                             "linked: {train.micro_batch: {4: {train.lr: 0.1}}}\ntiers:",
                             "field linked.train.micro_batch has no entry for grid value 8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_suite_is_one_line_and_exit_2(case: str, suites_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    old, new, expected = CASES[case]
    path = suites_dir / "tiny.yaml"
    text = path.read_text()
    assert old in text, "the test's edit must apply"
    path.write_text(text.replace(old, new, 1))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"repro: error: {path}") or err.startswith("repro: error: suite tiny")
    assert expected in err
    assert not results.exists()


def _absolute(ref_id: str, normalizer: str, value: float, tolerance: float, metric: str = "top1",
              extra: str = "tolerance_from: measurement, note: a stated difference") -> str:
    return (f"  - {{kind: absolute, id: {ref_id}, metric: {metric}, value: {value}, tolerance: {tolerance}, "
            f"setting: {{normalizer: {normalizer}}}, source: s, confidence: P, tiers: [smoke], {extra}}}\n")


#: the reference rules of repro.suite.validate.check_references, each as an edit of tests/conftest.py's tiny suite
#: (whose one claim is gn − bn ≥ -50 on top1) and the one-line error it must give; every edit loaded before them
REFERENCE_RULES = {
    "claim compares a setting with itself": (
        "b: {normalizer: bn}", "b: {normalizer: gn}",
        "field references.0.b: gn-vs-bn: equals a ({'normalizer': 'gn'}): the claim compares a setting with itself"),
    "difference of percentages below -100": (
        "    min: -50", "    min: -100",
        "field references.0.min: gn-vs-bn: -100 cannot be violated: a − b of top1, a percentage, lies in [-100, 100]"),
    "difference of percentages above 100": (
        "    min: -50", "    max: 100",
        "field references.0.max: gn-vs-bn: 100 cannot be violated"),
    "infinite bound": ("    min: -50", "    min: -.inf", "field references.0.min: gn-vs-bn: -inf cannot be violated"),
    "percent change below -100": (
        "    min: -50", "    min: -100\n    percent: true",
        "field references.0.min: gn-vs-bn: -100 cannot be violated: a change in % of b of top1"),
    "infinite tolerance": (
        "references:\n", "references:\n" + _absolute("bn-top1", "bn", 90.0, ".inf"),
        "field references.0.tolerance: bn-top1: inf admits every value, so the reference checks nothing"),
    "tolerance without its source": (
        "references:\n", "references:\n" + _absolute("bn-top1", "bn", 90.0, 1.0, extra="note: n"),
        "field references.0.tolerance_from: bn-top1: required: where the tolerance 1 comes from; allowed: paper_std"),
    "paper_std named but not given": (
        "references:\n", "references:\n" + _absolute("bn-top1", "bn", 90.0, 1.0, extra="tolerance_from: paper_std"),
        "field references.0.paper_std: bn-top1: required by tolerance_from paper_std"),
    "measurement without a note": (
        "references:\n", "references:\n" + _absolute("bn-top1", "bn", 90.0, 1.0, extra="tolerance_from: measurement"),
        "field references.0.note: bn-top1: tolerance_from measurement needs a note naming the difference"),
    # mimicnorm-memory before its fix: BN 27,083 ± 8,100 and MimicNorm 22,489 ± 6,700 MB (here gn stands in for
    # MimicNorm), while a claim says MimicNorm saves 10 to 30 %: BN's own measurement (21,461) passed MimicNorm's
    "tolerance admits the other setting's value": (
        "references:\n", "references:\n" + _absolute("bn-memory", "bn", 27083, 8100, "peak_memory_mb")
        + _absolute("gn-memory", "gn", 22489, 6700, "peak_memory_mb")
        + "  - {kind: relative, id: gn-saves, claim: c, metric: peak_memory_mb, a: {normalizer: gn}, "
          "b: {normalizer: bn}, min: -30, max: -10, percent: true, source: s, tiers: [smoke]}\n",
        "field references.1.tolerance: gn-memory: 22489 ± 6700 admits bn-memory's 27083, yet gn-saves says the two "
        "settings differ: the tolerance cannot tell them apart; allowed: below 4594"),
    # imagenet-c-tta before its fix: TENT 44.0 ± 3 and EATA 52.19 ± 1.5 (bn and gn stand in), and "EATA lowers
    # TENT's error": the three could not all pass
    "references that cannot all pass": (
        "references:\n", "references:\n" + _absolute("bn-error", "bn", 44.0, 3.0, "mean_error_s5")
        + _absolute("gn-error", "gn", 52.19, 1.5, "mean_error_s5")
        + "  - {kind: relative, id: gn-beats-bn, claim: c, metric: mean_error_s5, a: {normalizer: gn}, "
          "b: {normalizer: bn}, max: 0.0, source: s, tiers: [smoke]}\n",
        "field references.2: gn-beats-bn cannot pass while gn-error and bn-error do: their values ± tolerances put "
        "a − b in [3.69, 12.69], outside the claim's [-inf, 0]"),
}


@pytest.mark.parametrize("rule", list(REFERENCE_RULES))
def test_reference_rule_is_one_line_and_exit_2(rule: str, suites_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """A claim no outcome can violate, a tolerance that admits anything, says nothing of where it comes from or
    cannot tell apart two settings a claim orders, and references that cannot pass together are refused at load."""
    old, new, expected = REFERENCE_RULES[rule]
    path = suites_dir / "tiny.yaml"
    text = path.read_text()
    assert old in text, "the test's edit must apply"
    path.write_text(text.replace(old, new, 1))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"repro: error: {path}: field references.")
    assert expected in err
    assert not results.exists()


def test_tolerances_that_tell_ordered_settings_apart_and_close_claims_load(suites_dir: Path) -> None:
    """What the rules leave alone: a value on the other's edge (a reproduction there straddles the bound, never
    passes), and absolute references whose tolerances admit each other's values where the only claim between them
    says they are close (MimicNorm's and BN's accuracies in the paper)."""
    path = suites_dir / "tiny.yaml"
    close = path.read_text().replace("references:\n", "references:\n" + _absolute("bn-top1", "bn", 74.72, 1.5)
                                     + _absolute("gn-top1", "gn", 74.96, 1.5), 1)
    path.write_text(close)
    load_suite(path)
    edge = close.replace("value: 74.96, tolerance: 1.5", "value: 76.22, tolerance: 1.5").replace(
        "    min: -50", "    min: 0.0")
    path.write_text(edge)
    load_suite(path)


def test_missing_file_and_unknown_name(suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(suites_dir / "nope.yaml")]) == 2
    assert "nope.yaml: suite file does not exist" in capsys.readouterr().err
    assert main(["run", "nope"]) == 2
    assert "known: tiny" in capsys.readouterr().err


def test_invalid_yaml_names_the_line(suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = suites_dir / "tiny.yaml"
    path.write_text(path.read_text() + "\n  bad: [unclosed\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "line" in err


def test_name_must_match_file(suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = suites_dir / "other.yaml"
    path.write_text((suites_dir / "tiny.yaml").read_text())
    assert main(["run", str(path)]) == 2
    assert "field name: 'tiny' must equal the file name 'other'" in capsys.readouterr().err


def test_unknown_tier(suites_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "tiny", "--tier", "huge"]) == 2
    assert "tier 'huge' is not defined; allowed: full, smoke" in capsys.readouterr().err


def test_expansion_and_run_ids(suites_dir: Path) -> None:
    suite, _ = load_suite("tiny")
    runs = expand(suite, "smoke")
    assert [r.setting["normalizer"] for r in runs] == ["bn", "gn"]
    assert len({r.run_id for r in runs}) == 2
    assert [r.run_id for r in expand(suite, "smoke")] == [r.run_id for r in runs], "ids are a pure function of config"
    assert runs[0].config["train"]["momentum"] == 0.9, "defaults are resolved into the stored config"


def test_amp_cpu_enters_the_run_id_only_when_set(suites_dir: Path) -> None:
    """``train.amp_cpu`` came after records were committed: at its default it stays out of the stored config, so
    existing ids hold; set, it changes the id and shows in the config, and an id is still its config's hash (as
    ``repro unpack`` re-derives it)."""
    suite, _ = load_suite("tiny")
    plain = expand(suite, "smoke")
    with_grid = Suite.model_validate({**suite.model_dump(), "grid": {"train.amp_cpu": [False, True]}})
    fp32 = [r for r in expand(with_grid, "smoke") if not r.setting["train.amp_cpu"]]
    bf16 = [r for r in expand(with_grid, "smoke") if r.setting["train.amp_cpu"]]
    assert [r.run_id for r in fp32] == [r.run_id for r in plain]
    assert all("amp_cpu" not in r.config["train"] for r in fp32)
    assert all(r.config["train"]["amp_cpu"] is True for r in bf16)
    assert not {r.run_id for r in bf16} & {r.run_id for r in plain}
    assert all(run_id_of(r.config) == r.run_id for r in fp32 + bf16)
    assert [TrainConfig.model_validate(r.config["train"]).amp_cpu for r in fp32 + bf16] == [False, False, True, True]


def test_the_typed_config_holds_what_the_stored_config_holds() -> None:
    """Every run of every shipped suite's tiers: the typed config tasks read (validated once, at expansion) says
    what the stored config says (what records keep and run ids hash), ``sequential_micro_batches`` of unshared
    seeds included, and the run id is still the stored config's hash. Typed again from the stored form (as the cost
    model types a record's), it is the same typed config."""
    from repro.suite.load import list_suite_files
    from repro.tasks.base import typed_config

    unshared = 0
    for path in list_suite_files():
        suite, _ = load_suite(path)
        for tier in suite.tiers:
            for run in expand(suite, tier):
                typed, stored = run.typed_config, run.config
                assert run_id_of(stored) == run.run_id
                assert (typed.seed, typed.backbone) == (stored["seed"], stored["backbone"])
                assert vars(typed.normalizer) == stored["normalizer"]
                assert typed.dataset.model_dump() == stored["dataset"] and typed.model.model_dump() == stored["model"]
                assert typed.train.stored_dump() == stored["train"], (path, tier, run.label)
                assert typed.task_options.model_dump() == stored["task_options"]
                assert typed.task == stored["task"] and typed_config(stored) == typed, (path, tier, run.label)
                unshared += typed.train.sequential_micro_batches
    assert unshared > 0, "no unshared seed among the suites: the flag expansion sets went untested"


def test_every_shipped_suite_validates() -> None:
    """The suites and experiments in the repository load (the reference rules included), and their smoke tiers
    expand to at least one run."""
    root = Path(__file__).resolve().parents[1]
    shipped = sorted([*(root / "suites").glob("*.yaml"), *(root / "benchmarks" / "experiments").glob("*.yaml")])
    assert len(shipped) > 17
    for path in shipped:
        suite, _ = load_suite(path)
        assert expand(suite, "smoke")


def test_tier_normalizer_options_and_linked_grid_values(suites_dir: Path) -> None:
    """A tier's normalizer options merge into the suite's; a linked grid value sets the fields it implies."""
    path = suites_dir / "tiny.yaml"
    path.write_text(path.read_text().replace("tiers:", "grid: {train.micro_batch: [4, 8]}\nlinked:\n"
                                             "  train.micro_batch: {4: {train.batch_size: 16, train.lr: 0.02},"
                                             " 8: {train.batch_size: 32, train.lr: 0.04}}\ntiers:", 1)
                    .replace("  smoke: {}", "  smoke: {normalizer_options: {gn: {group_size: 4}}}"))
    suite, _ = load_suite(path)
    smoke = {(r.setting["normalizer"], r.setting["train.micro_batch"]): r.config for r in expand(suite, "smoke")}
    assert smoke["gn", 4]["normalizer"]["options"] == {"group_size": 4}
    assert [(smoke["bn", m]["train"]["batch_size"], smoke["bn", m]["train"]["lr"]) for m in (4, 8)] == [
        (16, 0.02), (32, 0.04)]
    full = {r.setting["normalizer"]: r.config for r in expand(suite, "full")}
    assert full["gn"]["normalizer"]["options"] == {"group_size": 8}


def test_a_tier_can_train_one_normalizer_with_its_own_fields(suites_dir: Path) -> None:
    """``normalizer_train`` overrides the tier's train fields for the normalizer it names only: the laptop tiers
    keep ``none`` in float32 under a bf16 tier, so its runs are the float32 runs, ids included."""
    path = suites_dir / "tiny.yaml"
    path.write_text(path.read_text().replace(
        "  smoke: {}", "  smoke: {train: {amp_cpu: true}, normalizer_train: {gn: {amp_cpu: false, lr: 0.01}}}"))
    suite, _ = load_suite(path)
    smoke = {r.setting["normalizer"]: r for r in expand(suite, "smoke")}
    assert smoke["bn"].config["train"]["amp_cpu"] is True
    assert "amp_cpu" not in smoke["gn"].config["train"] and smoke["gn"].config["train"]["lr"] == 0.01
    text = path.read_text().replace("normalizer_train: {gn: {amp_cpu: false, lr: 0.01}}", "normalizer_train: {}")
    path.write_text(text.replace("train: {amp_cpu: true}", "train: {lr: 0.01}"))
    plain, _ = load_suite(path)
    (gn,) = [r for r in expand(plain, "smoke") if r.setting["normalizer"] == "gn"]
    assert gn.run_id == smoke["gn"].run_id


def test_tier_runs_a_subset_of_normalizers_and_list_shows_its_minutes(suites_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    path = suites_dir / "tiny.yaml"
    # the full tier: the suite's one reference (gn against bn) checks the smoke tier, which keeps both
    path.write_text(path.read_text().replace("  full: {}", "  full: {normalizers: [gn], expected_minutes: 2.5}"))
    suite, _ = load_suite(path)
    assert [r.setting["normalizer"] for r in expand(suite, "full")] == ["gn"]
    assert [r.setting["normalizer"] for r in expand(suite, "smoke")] == ["bn", "gn"]
    assert main(["list"]) == 0
    assert "full: 1 runs (~2.5 min on 2 CPU cores)" in capsys.readouterr().out


ROW_KEY_CASES = {  # (suite, text replaced, replacement, message): a row that no run of the tier writes
    "unknown method": ("cifar10-c-tent", "setting: {method: source, batch_size: 200}",
                       "setting: {method: no_such_method, batch_size: 200}", "method 'no_such_method' is in no row"),
    "batch size not evaluated": ("cifar10-c-tent", "setting: {method: source, batch_size: 200}",
                                 "setting: {method: source, batch_size: 7}", "batch_size 7 is in no row"),
    "severity out of the tier": ("cifar10-c-tent", "setting: {method: source, batch_size: 200}",
                                 "setting: {method: source, batch_size: 200, severity: 9}", "severity 9 is in no row"),
    "corruption of a relative claim's a": ("fmnist-c-tta", "a: {normalizer: bn, method: ptbn, batch_size: 64}",
                                           "a: {normalizer: bn, method: ptbn, corruption: fog_typo, batch_size: 64}",
                                           "corruption 'fog_typo' is in no row"),
    "method at a batch size it does not run": ("fmnist-c-tta", "a: {normalizer: bn, method: ptbn, batch_size: 64}",
                                               "a: {normalizer: bn, method: bn_adapt_N16, batch_size: 64}",
                                               "no row of tier"),
}


@pytest.mark.parametrize("case", list(ROW_KEY_CASES))
def test_a_reference_naming_a_row_no_run_writes_is_refused(case: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    suite, old, new, expected = ROW_KEY_CASES[case]
    text = (Path(__file__).parents[1] / "suites" / f"{suite}.yaml").read_text()
    assert old in text, "the test's edit must apply"
    path = tmp_path / f"{suite}.yaml"
    path.write_text(text.replace(old, new, 1))
    assert main(["run", str(path), "--tier", "smoke", "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: field references." in err and expected in err
    assert not (tmp_path / "results").exists()
