"""Suite-level features the paper suites use (exclude, percent claims) and the suites' pinned relations."""

from pathlib import Path

import pytest

from repro.errors import UserError
from repro.results.check import check
from repro.results.tables import records_frame
from repro.suite import expand, load_suite
from repro.suite.schema import Suite
from repro.tasks.base import model_key

SUITES = Path(__file__).parents[1] / "suites"
BASE = {
    "name": "t", "version": 1, "description": "d", "citation": "c", "dataset": {"name": "fashion_mnist"},
    "backbones": ["resnet18", "mobilenetv2_050"], "normalizers": ["bn", "fixup"], "seeds": [0, 1],
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.1}, "grid": {"train.lr": [0.1, 1.0]},
    "tiers": {"smoke": {}, "full": {}},
}


@pytest.mark.parametrize("tier", ["smoke", "full", "laptop"])
def test_qbn_fmnist_converts_the_bn_models_fmnist_normalizers_trains(tier: str) -> None:
    normalizers, _ = load_suite(SUITES / "fmnist-normalizers.yaml")
    quantized, _ = load_suite(SUITES / "qbn-fmnist.yaml")
    trained = {model_key(r.config) for r in expand(normalizers, tier) if r.config["normalizer"]["name"] == "bn"}
    converted = {model_key(r.config) for r in expand(quantized, tier)}
    assert converted == trained
    assert normalizers.task_options["save_checkpoint"] is True


FMNIST_SUITES = ("fmnist-baseline", "fmnist-normalizers", "fmnist-lr-sweep", "fmnist-microbatch", "fmnist-c-tta",
                 "qbn-fmnist")


def test_laptop_tiers_run_three_seeds_on_two_cores_and_use_the_whole_test_set() -> None:
    """Three seeds, so that every relative claim has an interval; the minutes are those measured (README): about
    4 hours in all at float32, over the 2.5 hours aimed at, so this guards against growing further."""
    suites = {name: load_suite(SUITES / f"{name}.yaml")[0] for name in FMNIST_SUITES}
    minutes = {name: suite.tiers["laptop"].expected_minutes for name, suite in suites.items()}
    assert all(m is not None for m in minutes.values()) and sum(minutes.values()) <= 240
    assert all(len(suite.tiers["laptop"].seeds) >= 3 for suite in suites.values())
    for name, suite in suites.items():
        runs = expand(suite, "laptop")
        assert runs and all(r.config["dataset"]["test_subset"] is None for r in runs), name
    tta = expand(suites["fmnist-c-tta"], "laptop")[0].config["task_options"]
    assert tta["images"] >= 1000 and len(tta["corruptions"]) == 15 and tta["severities"] == [1, 2, 3, 4, 5]


def test_laptop_bn_model_is_trained_once_for_every_suite_that_uses_it() -> None:
    """fmnist-baseline saves one per seed; fmnist-c-tta and qbn-fmnist load them, for the seeds they run (the train
    task of fmnist-normalizers trains the same recipe again, to the same checkpoints)."""
    def bn_keys(name: str) -> set[str]:
        suite, _ = load_suite(SUITES / f"{name}.yaml")
        return {model_key(r.config) for r in expand(suite, "laptop") if r.config["normalizer"]["label"] == "bn"}

    baseline, _ = load_suite(SUITES / "fmnist-baseline.yaml")
    assert baseline.tiers["laptop"].task["save_checkpoint"] is True
    assert len(bn_keys("fmnist-baseline")) == len(baseline.tiers["laptop"].seeds) == 5
    for name in ("fmnist-c-tta", "qbn-fmnist", "fmnist-normalizers"):
        assert bn_keys(name) and bn_keys(name) <= bn_keys("fmnist-baseline"), name


def test_exclude_drops_matching_settings_only() -> None:
    suite = Suite.model_validate({**BASE, "exclude": [{"backbone": "mobilenetv2_050", "normalizer": "fixup"},
                                                      {"normalizer": "bn", "train.lr": 1.0}]})
    settings = [(r.setting["backbone"], r.setting["normalizer"], r.setting["train.lr"]) for r in expand(suite, "full")]
    expected = [(b, n, lr) for b in BASE["backbones"] for n in BASE["normalizers"] for lr in (0.1, 1.0) for _ in (0, 1)
                if not (b == "mobilenetv2_050" and n == "fixup") and not (n == "bn" and lr == 1.0)]
    assert settings == expected


def test_exclude_with_an_unknown_column_is_a_user_error(tmp_path: Path) -> None:
    text = (SUITES / "fmnist-normalizers.yaml").read_text().replace("{backbone: mobilenetv2_050, normalizer: fixup}",
                                                                      "{backbone: mobilenetv2_050, norm: fixup}")
    path = tmp_path / "fmnist-normalizers.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"field exclude\.0: unknown setting column 'norm'"):
        load_suite(path)


ONE_BACKBONE = {**BASE, "backbones": ["resnet18"], "grid": {}}
RUN_IDS = {(r.setting["normalizer"], r.setting["seed"]): r.run_id
           for r in expand(Suite.model_validate(ONE_BACKBONE), "full")}


def _record(normalizer: str, seed: int, memory: float) -> dict:
    return {"suite": "t", "suite_version": 1, "tier": "full", "run_id": RUN_IDS[normalizer, seed], "status": "ok",
            "setting": {"backbone": "resnet18", "normalizer": normalizer, "seed": seed}, "metrics": {},
            "wall_time_s": 1.0, "images_per_s": 1.0, "peak_memory_mb": memory}


def test_percent_claim_compares_relative_to_b() -> None:
    frame = records_frame([_record("bn", 0, 1000.0), _record("bn", 1, 1200.0), _record("fixup", 0, 800.0),
                           _record("fixup", 1, 960.0)])
    claim = {"kind": "relative", "id": "r", "claim": "c", "metric": "peak_memory_mb", "a": {"normalizer": "fixup"},
             "b": {"normalizer": "bn"}, "min": -30, "max": -10, "percent": True, "source": "s"}
    (result,) = check(Suite.model_validate({**ONE_BACKBONE, "references": [claim]}), frame)
    assert result.reproduced == pytest.approx(100 * (880 - 1100) / 1100) and result.status == "pass"
    (absolute,) = check(Suite.model_validate({**ONE_BACKBONE, "references": [{**claim, "percent": False}]}), frame)
    # in MB the seeds differ by −200 and −240: two seeds' t-interval (± 12.7 SE) straddles [−30, −10]
    assert absolute.reproduced == pytest.approx(-220) and absolute.status == "inconclusive"


EXPERIMENTS = Path(__file__).parents[1] / "benchmarks" / "experiments"


def _at_float32(config: dict) -> dict:
    """A run's config trained in float32: the laptop tiers train under CPU bf16 (``train.amp_cpu``) since
    2026-12-05; the experiments ran before, against the float32 records kept in results/laptop-fp32/."""
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "amp_cpu"}}


def _recipe(run) -> str:
    """A run's float32 trained-model key with the seed left out: what an experiment must share with the tier it
    explains."""
    return model_key(_at_float32({**run.config, "seed": 0}))


def test_experiments_train_the_recipe_of_the_laptop_tier_they_explain() -> None:
    """The experiments behind the laptop findings vary only what they say they vary (seeds, epochs, group size,
    BRN's clipping), so their numbers stand next to the tier's float32 records."""
    baseline, _ = load_suite(SUITES / "fmnist-baseline.yaml")
    gn_experiment, _ = load_suite(EXPERIMENTS / "gn-close-to-bn.yaml")
    laptop = {r.setting["normalizer"]: model_key(_at_float32(r.config))
              for r in expand(baseline, "laptop") if r.setting["seed"] == 0}
    four_epochs = {(r.setting["normalizer"], r.setting["seed"]): model_key(r.config)
                   for r in expand(gn_experiment, "full") if r.setting["train.epochs"] == 4}
    assert four_epochs["bn", 0] == laptop["bn"] and four_epochs["gn", 0] == laptop["gn"]

    microbatch, _ = load_suite(SUITES / "fmnist-microbatch.yaml")
    micro_experiment, _ = load_suite(EXPERIMENTS / "microbatch-laptop.yaml")
    at_two = {r.setting["normalizer"]: _recipe(r) for r in expand(microbatch, "laptop")
              if r.setting["train.micro_batch"] == 2}
    runs = expand(micro_experiment, "full")
    assert {r.setting["seed"] for r in runs if r.setting["normalizer"] != "brn_clipped_to_bn"} == {1, 2}
    for run in runs:
        if run.setting["normalizer"] != "brn_clipped_to_bn":
            assert _recipe(run) == at_two[run.setting["normalizer"]], run.setting


def test_the_cpu_bf16_experiment_changes_only_the_precision_of_the_laptop_bn_runs() -> None:
    """cpu-bf16-laptop's bf16 runs are fmnist-baseline's laptop bn runs (same model keys, so their checkpoints
    load, for the experiment's seeds 0-2); its float32 runs differ from them in ``train.amp_cpu`` alone."""
    baseline, _ = load_suite(SUITES / "fmnist-baseline.yaml")
    experiment, _ = load_suite(EXPERIMENTS / "cpu-bf16-laptop.yaml")
    laptop_bn = {r.setting["seed"]: r.config for r in expand(baseline, "laptop") if r.setting["normalizer"] == "bn"}
    runs = expand(experiment, "full")
    assert {(r.setting["train.amp_cpu"], r.setting["seed"]) for r in runs} == {
        (amp_cpu, seed) for amp_cpu in (False, True) for seed in (0, 1, 2)}
    for run in runs:
        laptop = laptop_bn[run.setting["seed"]]
        assert laptop["train"]["amp_cpu"] is True
        if run.setting["train.amp_cpu"]:
            assert model_key(run.config) == model_key(laptop)
        else:
            assert run.config["train"] == _at_float32(laptop)["train"]
            assert model_key(run.config) == model_key(_at_float32(laptop))


def test_the_batch_128_experiment_changes_only_the_batch_and_what_follows_from_it() -> None:
    """microbatch-batch128-laptop is fmnist-microbatch's laptop tier at four times the batch: the learning rate
    scaled with it, BRN's schedule in the recipe's steps; nothing else differs (it does not time a BatchNorm twin,
    which adds a timing metric and changes no number)."""
    microbatch, _ = load_suite(SUITES / "fmnist-microbatch.yaml")
    experiment, _ = load_suite(EXPERIMENTS / "microbatch-batch128-laptop.yaml")

    def recipe(run, batch: bool) -> dict:
        config = {**_at_float32(run.config), "seed": 0, "suite": None, "tier": None}
        config["task_options"] = {k: v for k, v in config["task_options"].items() if k != "step_time_vs_bn"}
        # the tier's unshared seeds train GN's micro-batches one pass each (sequential_micro_batches); the
        # experiment, which has no GN, shares nothing
        config["train"] = {k: v for k, v in config["train"].items()
                           if k != "sequential_micro_batches" and (not batch or k not in ("batch_size", "lr"))}
        if batch and run.setting["normalizer"] == "brn":
            config["normalizer"] = {**config["normalizer"], "options": {}}
        return config

    laptop = {(r.setting["normalizer"], r.setting["train.micro_batch"]): r for r in expand(microbatch, "laptop")}
    runs = expand(experiment, "full")
    assert {(r.setting["normalizer"], r.setting["train.micro_batch"]) for r in runs} == set(laptop)
    for run in runs:
        tier_run = laptop[run.setting["normalizer"], run.setting["train.micro_batch"]]
        assert recipe(run, batch=True) == recipe(tier_run, batch=True), run.setting
        assert (run.config["train"]["batch_size"], run.config["train"]["lr"]) == (
            4 * tier_run.config["train"]["batch_size"], 4 * tier_run.config["train"]["lr"])
