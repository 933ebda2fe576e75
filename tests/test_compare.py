"""repro compare on synthetic results folders: matching by run id, paired-seed intervals, the tolerance rule for
single runs, statuses, provenance, bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from repro.cli import main
from repro.errors import UserError
from repro.results.compare import INTERVAL_RULE, TOLERANCE_RULE, compare
from repro.store.atomic import write_json_atomic
from repro.store.records import RECORD_SCHEMA, record_path

PROVENANCE = {"git_commit": "abc", "torch": "2.15.0+cpu", "device": "cpu", "device_name": "AMD EPYC",
              "cpu_threads": 2, "packages": {"torch": "2.15.0", "timm": "1.0.31"}}


def record(run_id: str, seed: int, top1: float, *, status: str = "ok", rows: list | None = None,
           wall_time_s: float = 100.0, backbone: str = "resnet20", config: dict | None = None, **provenance) -> dict:
    return {"schema": RECORD_SCHEMA, "suite": "s", "suite_version": 1, "run_id": run_id, "status": status,
            "tier": "laptop", "setting": {"backbone": backbone, "normalizer": "bn", "seed": seed},
            "config": config or {}, "metrics": {"top1": top1, "loss": 0.3, "step_time_ms": 40.0 + wall_time_s},
            "rows": rows or [], "wall_time_s": wall_time_s, "provenance": {**PROVENANCE, **provenance}}


def write(folder: Path, *records: dict) -> Path:
    for rec in records:
        write_json_atomic(record_path(folder, rec["suite"], rec["run_id"]), rec)
    return folder


def seeds(folder: Path, top1: list[float], **kwargs) -> Path:
    """One setting with a run per seed (run id r<seed>)."""
    return write(folder, *(record(f"r{seed}", seed, value, **kwargs) for seed, value in enumerate(top1)))


def top1_row(comparison):
    rows = comparison.settings[comparison.settings["metric"] == "top1"]
    assert len(rows) == 1
    return rows.iloc[0]


def test_identical_folders_ignore_timing(tmp_path):
    a = write(tmp_path / "a", record("r0", 0, 91.0), record("r1", 1, 92.0))
    b = write(tmp_path / "b", record("r0", 0, 91.0, wall_time_s=900.0), record("r1", 1, 92.0))
    result = compare(a, b)
    assert result.verdict == "identical"
    assert list(result.runs["metrics"]) == [2, 2]  # top1 and loss; step_time_ms and wall time are not judged
    assert set(result.settings["verdict"]) == {"identical"} and result.provenance == []


def test_runs_match_by_run_id_and_pair_by_seed(tmp_path):
    a = seeds(tmp_path / "a", [91.0, 92.0, 90.0])
    b = seeds(tmp_path / "b", [91.3, 92.0])  # seed 2 only in A
    result = compare(a, b, tolerance=0.5)
    assert (result.only_a, result.only_b) == (1, 0)
    assert result.runs.set_index("run_id")["max_abs_delta"].to_dict() == pytest.approx({"r0": 0.3, "r1": 0.0})
    top1 = top1_row(result)
    assert top1["n"] == 2 and top1["rule"] == INTERVAL_RULE
    assert top1["a"] == pytest.approx((91.0 + 92.0) / 2) and top1["delta"] == pytest.approx(0.3 / 2)
    assert top1["a_std"] == pytest.approx(np.std([91.0, 92.0], ddof=1))


def test_paired_differences_whose_interval_excludes_0_differ(tmp_path, capsys):
    """Every seed 0.2 to 0.3 points higher in B: each within the tolerance, together beyond seed noise."""
    top1_a, deltas = [90.0, 91.5, 92.0], [0.2, 0.3, 0.25]
    a = seeds(tmp_path / "a", top1_a)
    b = seeds(tmp_path / "b", [x + d for x, d in zip(top1_a, deltas, strict=True)])
    result = compare(a, b, tolerance=0.5)
    mean, se = np.mean(deltas), np.std(deltas, ddof=1) / math.sqrt(3)
    half = stats.t.ppf(0.975, 2) * se
    top1 = top1_row(result)
    assert top1["n"] == 3 and top1["rule"] == INTERVAL_RULE and top1["verdict"] == "differs"
    assert (top1["delta"], top1["se"]) == pytest.approx((mean, se))
    assert (top1["low"], top1["high"]) == pytest.approx((mean - half, mean + half)) and mean - half > 0
    assert top1["a_std"] == pytest.approx(np.std(top1_a, ddof=1))
    assert result.settings.set_index("metric").loc["loss", "verdict"] == "identical"
    assert result.verdict == "differs"
    # a higher confidence widens the interval until it holds 0
    wide = stats.t.ppf((1 + 0.999) / 2, 2) * se
    assert mean - wide < 0 and compare(a, b, confidence=0.999).verdict == "within noise"

    assert main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert f"| [{mean - half:.4g}, {mean + half:.4g}] |" in out and "95% interval" in out
    assert "**Verdict: differs** (1 differs, 1 identical;" in out


def test_differences_straddling_0_are_within_noise_beyond_the_tolerance(tmp_path, capsys):
    top1_a, deltas = [90.0, 91.5, 92.0], [1.6, -0.6, 0.8]  # even their mean exceeds the tolerance
    a = seeds(tmp_path / "a", top1_a)
    b = seeds(tmp_path / "b", [x + d for x, d in zip(top1_a, deltas, strict=True)])
    result = compare(a, b, tolerance=0.5)
    assert result.runs["max_abs_delta"].max() == pytest.approx(1.6)
    top1 = top1_row(result)
    half = stats.t.ppf(0.975, 2) * np.std(deltas, ddof=1) / math.sqrt(3)
    assert (top1["low"], top1["high"]) == pytest.approx((np.mean(deltas) - half, np.mean(deltas) + half))
    assert top1["low"] < 0 < top1["high"] and top1["verdict"] == "within noise"
    assert result.verdict == "within noise"
    assert main(["compare", str(a), str(b), "--tolerance", "0.5"]) == 0
    assert "**Verdict: within noise**" in capsys.readouterr().out


def test_a_single_seed_in_common_keeps_the_tolerance_rule(tmp_path, capsys):
    a = write(tmp_path / "a", record("r0", 0, 91.0), record("m0", 0, 80.0, backbone="resnet56"))
    b = write(tmp_path / "b", record("r0", 0, 91.3), record("m0", 0, 80.0, backbone="resnet56"))
    result = compare(a, b, tolerance=0.5)
    top1 = result.settings[result.settings["metric"] == "top1"].set_index("setting")
    assert list(top1["n"]) == [1, 1] and set(top1["rule"]) == {TOLERANCE_RULE}
    assert top1["verdict"].to_dict() == {"backbone=resnet20 normalizer=bn": "within tolerance",
                                         "backbone=resnet56 normalizer=bn": "identical"}
    assert top1["se"].isna().all() and top1["a_std"].isna().all()
    assert result.verdict == "within tolerance" and compare(a, b, tolerance=0.2).verdict == "differs"
    # more seeds on one side only: still a single seed in common
    more = write(tmp_path / "more", record("r0", 0, 91.3), record("r1", 1, 95.0), record("r2", 2, 85.0))
    one_in_common = top1_row(compare(a, more, tolerance=0.5))
    assert (one_in_common["n"], one_in_common["rule"], one_in_common["verdict"]) == (1, TOLERANCE_RULE,
                                                                                      "within tolerance")
    assert main(["compare", str(a), str(b), "--tolerance", "0.2"]) == 1
    assert "**Verdict: differs**" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "--tolerance", "0.3"]) == 0
    assert "**Verdict: within tolerance** (1 within tolerance, 3 identical;" in capsys.readouterr().out


def test_rows_and_a_status_difference(tmp_path):
    row = {"method": "ptbn", "corruption": "fog", "severity": 3, "batch_size": 64, "error": 20.0, "n": 1000}
    a = write(tmp_path / "a", record("r0", 0, 91.0, rows=[row]), record("d0", 0, 92.0, backbone="vit"))
    b = write(tmp_path / "b", record("r0", 0, 91.0, rows=[{**row, "error": 21.5}]),
              record("d0", 0, 92.0, backbone="vit", status="diverged"))
    result = compare(a, b, tolerance=2.0)
    runs = result.runs.set_index("run_id")
    assert runs.loc["r0", "max_abs_delta"] == pytest.approx(1.5)
    assert runs.loc["r0", "worst"] == "error (method=ptbn corruption=fog severity=3 batch_size=64)"
    error = result.settings.set_index("metric").loc["error"]
    assert error["row"] == "method=ptbn corruption=fog severity=3 batch_size=64"
    assert error["verdict"] == "within tolerance" and error["delta"] == pytest.approx(1.5)
    diverged = result.settings[result.settings["setting"] == "backbone=vit normalizer=bn"]
    assert set(diverged["verdict"]) == {"differs"} and set(diverged["status"]) == {"A ok, B diverged"}
    assert result.verdict == "differs"


def test_nan_on_both_sides_agrees_and_on_one_side_differs(tmp_path):
    """A row metric that a method does not measure is nan on both sides; nan on one side only is a change."""
    row = {"method": "source", "corruption": "all", "batch_size": 8, "error": 40.0, "clean_error_after": math.nan}
    a = seeds(tmp_path / "a", [91.0, 92.0], rows=[row])
    assert compare(a, seeds(tmp_path / "b", [91.0, 92.0], rows=[row])).verdict == "identical"
    b = write(tmp_path / "c", record("r0", 0, 91.0, rows=[row]),
              record("r1", 1, 92.5, rows=[{**row, "error": math.nan}]))
    result = compare(a, b)
    assert result.settings.set_index("metric").loc["error", "verdict"] == "differs" and result.verdict == "differs"
    # the run's worst change is the nan, not the 0.5 points of top-1
    assert result.runs.set_index("run_id").loc["r1", "worst"] == "error (method=source corruption=all batch_size=8)"


def test_provenance_names_what_changes_numbers_first(tmp_path, capsys):
    a = write(tmp_path / "a", record("r0", 0, 91.0, config={"train": {"amp": True}}))
    b = write(tmp_path / "b", record("r0", 0, 91.0, config={"train": {"amp": True}}, device="cuda", cpu_threads=8,
                                     torch="2.16.0+cu132", git_commit="def",
                                     packages={"torch": "2.16.0", "timm": "1.0.31"}))
    result = compare(a, b)
    assert result.provenance == [
        "precision: A fp32 on cpu vs B bf16 autocast on cuda",  # amp is ignored on CPU
        "device: A cpu vs B cuda",
        "cpu_threads: A 2 vs B 8",
        "torch: A 2.15.0+cpu vs B 2.16.0+cu132",
        "packages.torch: A 2.15.0 vs B 2.16.0",
        "git_commit: A abc vs B def",
    ]
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "- cpu_threads: A 2 vs B 8\n- torch: A 2.15.0+cpu vs B 2.16.0+cu132\n" in out


@pytest.mark.parametrize(("args", "message"), [
    (["b_missing"], "b_missing: no runs/ folder"),
    (["other"], "have no complete run in common"),
    (["b", "--tolerance", "-1"], "--tolerance -1.0: must be at least 0"),
    (["b", "--tolerance", "nan"], "--tolerance nan: must be at least 0"),
    (["b", "--confidence", "1"], "--confidence 1.0: must be between 0 and 1"),
    (["b", "--confidence", "0"], "--confidence 0.0: must be between 0 and 1"),
    (["b", "--confidence", "nan"], "--confidence nan: must be between 0 and 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    write(tmp_path / "a", record("r0", 0, 91.0))
    write(tmp_path / "b", record("r0", 0, 91.0))
    write(tmp_path / "other", record("r9", 0, 91.0))
    argv = ["compare", str(tmp_path / "a"), str(tmp_path / args[0]), *args[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_the_same_run_twice_on_cpu_is_identical(suites_dir, tmp_path, capsys):
    """Same seed, same code, same machine: `repro compare` finds every judged number equal."""
    for folder in ("a", "b"):
        assert main(["run", "tiny", "--results", str(tmp_path / folder), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tolerance", "0"]) == 0
    report = capsys.readouterr().out
    assert "2 runs in common" in report and "**Verdict: identical**" in report


def test_timing_in_rows_and_runs_with_only_timing_metrics_are_not_judged(tmp_path):
    rows_a = [{"method": "sar", "batch_size": 8, "error": 40.0, "ms_per_image": 3.0}]
    rows_b = [{"method": "sar", "batch_size": 8, "error": 40.0, "ms_per_image": 14.0}]
    a, b = record("r0", 0, 91.0, rows=rows_a), record("r0", 0, 91.0, rows=rows_b)
    memory_a = {**record("m0", 0, 0.0), "metrics": {"peak_memory_mb": 100.0, "step_time_ms": 5.0}}
    memory_b = {**record("m0", 0, 0.0), "metrics": {"peak_memory_mb": 120.0, "step_time_ms": 9.0}}
    comparison = compare(write(tmp_path / "a", a, memory_a), write(tmp_path / "b", b, memory_b), tolerance=0.0)
    assert comparison.verdict == "identical"
    memory_only = compare(write(tmp_path / "c", memory_a), write(tmp_path / "d", memory_b), tolerance=0.0)
    assert memory_only.verdict == "identical" and memory_only.settings.empty


def test_a_run_that_collapses_on_one_side_is_named_and_differs(tmp_path):
    """The 2-thread rerun of fmnist-baseline: `none` ends at chance (10.00, loss ln 10) where the record trained."""
    fmnist = {"dataset": {"name": "fashion_mnist"}}
    a = write(tmp_path / "a", record("r0", 0, 88.36, config=fmnist))
    collapsed = record("r0", 0, 10.0, config=fmnist, cpu_threads=1)
    collapsed["metrics"]["loss"] = math.log(10)
    b = write(tmp_path / "b", collapsed)
    result = compare(a, b, tolerance=100.0)
    assert result.runs["status_b"].tolist() == ["ok, collapsed"] and result.verdict == "differs"
    assert any(line.startswith("cpu_threads") for line in result.provenance)


def test_two_recipes_of_the_same_settings_pair_by_setting_and_name_the_precision(tmp_path, capsys):
    """float32 records against bf16 ones: the run ids differ (the precision is in the config), so only
    ``match="setting"`` pairs them, seed by seed, and the provenance names the precision first."""
    fp32, bf16 = {"train": {"lr": 0.1}}, {"train": {"lr": 0.1, "amp_cpu": True}}
    top1_a, deltas = [91.4, 91.0, 91.3], [-0.1, 0.2, 0.0]
    a = write(tmp_path / "a", *(record(f"f{seed}", seed, x, config=fp32) for seed, x in enumerate(top1_a)))
    b = write(tmp_path / "b", *(record(f"b{seed}", seed, x + d, config=bf16)
                                for seed, (x, d) in enumerate(zip(top1_a, deltas, strict=True))))
    with pytest.raises(UserError, match="no complete run in common"):
        compare(a, b)
    result = compare(a, b, match="setting")
    top1 = top1_row(result)
    half = stats.t.ppf(0.975, 2) * np.std(deltas, ddof=1) / math.sqrt(3)
    assert top1["n"] == 3 and top1["delta"] == pytest.approx(np.mean(deltas))
    assert (top1["low"], top1["high"]) == pytest.approx((np.mean(deltas) - half, np.mean(deltas) + half))
    assert top1["verdict"] == "within noise"
    assert result.provenance[0] == "precision: A fp32 on cpu vs B bf16 autocast on cpu"
    assert main(["compare", str(a), str(b), "--match", "setting"]) == 0
    assert "bf16 autocast" in capsys.readouterr().out


def test_matching_by_setting_refuses_a_folder_with_two_recipes_of_one_setting(tmp_path):
    a = write(tmp_path / "a", record("f0", 0, 91.0), record("g0", 0, 91.2))
    b = write(tmp_path / "b", record("b0", 0, 91.1))
    with pytest.raises(UserError, match="runs f0 and g0 of suite s have one setting"):
        compare(a, b, match="setting")
    with pytest.raises(UserError, match="allowed: run_id, setting"):
        compare(a, b, match="seed")
