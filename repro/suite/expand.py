"""Expanding a suite and a tier into runs, each identified by a hash of its resolved configuration.

The configuration includes the suite's ``version``, so bumping it (as a suite must whenever its numbers change)
gives every run a new id: records of the older version are never taken as complete or current.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from pydantic import ValidationError

from repro.errors import UserError
from repro.norms import NORMALIZERS
from repro.registry import plugin_of
from repro.suite.schema import Suite
from repro.tasks.base import TASKS, RunSpec
from repro.tasks.config import DatasetSpec, ModelSpec, NormalizerChoice, RunConfig
from repro.train.config import TrainConfig

_SECTIONS = {"train": "train", "task": "task_options", "model": "model"}


def run_id_of(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_value(config: dict[str, Any], column: str) -> Any:
    """What a run's resolved config holds for one of its setting's columns (``backbone``, ``normalizer``,
    ``seed``, or a grid key such as ``train.lr``); KeyError or TypeError when it holds none."""
    if column == "normalizer":
        return config["normalizer"]["label"]
    if column in ("backbone", "seed"):
        return config[column]
    section, _, field = column.partition(".")
    return config[_SECTIONS[section]][field]


def _same(value: Any, wanted: Any) -> bool:
    """Equal, numbers compared as numbers (``0.1`` matches ``1e-1``, ``8`` matches ``8.0``) and others as text,
    as tables select rows."""
    numbers = (int, float)
    if isinstance(wanted, numbers) and not isinstance(wanted, bool):
        return isinstance(value, numbers) and not isinstance(value, bool) and float(value) == float(wanted)
    return str(value) == str(wanted)


def matches(setting: dict[str, Any], pattern: dict[str, Any]) -> bool:
    """Whether every ``column: value`` of ``pattern`` holds in ``setting`` (an ``exclude`` entry, a reference)."""
    return all(column in setting and _same(setting[column], value) for column, value in pattern.items())


def tier_settings(suite: Suite, tier: str) -> list[dict[str, Any]]:
    """Every setting of a tier before ``exclude``: what exclude entries and references must match."""
    spec = suite.tiers[tier]
    grid = {**suite.grid, **(spec.grid or {})}
    return [{"backbone": backbone, "normalizer": normalizer.column, **dict(zip(grid, values, strict=True)),
             "seed": seed}
            for backbone, normalizer, values, seed in itertools.product(
                spec.backbones or suite.backbones, suite.normalizers, itertools.product(*grid.values()),
                spec.seeds or suite.seeds)]


def plugins_used(config: dict[str, Any]) -> dict[str, str]:
    """``{distribution: version}`` of the plugins whose normalizer, backbone, dataset, task or adaptation methods
    this run uses: a new version of a plugin gives its runs new ids."""
    used = [plugin_of("normalizer", config["normalizer"]["name"]), plugin_of("backbone", config["backbone"]),
            plugin_of("dataset", config["dataset"]["name"]), plugin_of("task", config["task"]),
            *(plugin_of("adaptation method", method["name"]) for method in config["task_options"].get("methods", []))]
    return {plugin.distribution: plugin.version for plugin in used if plugin}


def invariant_grid_keys(config: dict[str, Any], grid_keys: list[str]) -> list[str]:
    """The grid keys along which this run's numbers cannot change (``Normalizer.invariant_to``).

    Mixup draws its pairs and weight per micro-batch, so with mixup on ``train.micro_batch`` matters to every
    normalizer.
    """
    invariant = set(NORMALIZERS.get(config["normalizer"]["name"]).invariant_to)
    if config["train"]["mixup_alpha"] > 0:
        invariant.discard("train.micro_batch")
    return [key for key in grid_keys if key in invariant]


def _measure_invariance(config: dict[str, Any], invariant: list[str]) -> None:
    """An unshared seed's run along the micro-batch computes its micro-batches one pass each: the one-pass path
    would compute exactly the whole batch's numbers (GN, Fixup), and the claim of invariance would compare a
    computation with itself."""
    train = config["train"]
    if "train.micro_batch" in invariant and (train["micro_batch"] or train["batch_size"]) < train["batch_size"]:
        train["sequential_micro_batches"] = True


def shared_execution_key(config: dict[str, Any], invariant: list[str]) -> str:
    """Equal for two runs whose configs differ only along ``invariant`` grid keys."""
    masked = json.loads(json.dumps(config))
    for key in invariant:
        section, _, field = key.partition(".")
        masked[_SECTIONS[section]][field] = "(shared)"
    return run_id_of(masked)


def expand(suite: Suite, tier: str, *, source: str | None = None) -> list[RunSpec]:
    """All runs of ``suite`` at ``tier``: backbones × normalizers × grid × seeds, in that nesting order, less the
    settings ``exclude`` names (a normalizer that does not apply to a backbone, a recipe for one model only).

    A run that differs from an earlier one only along grid keys its normalizer is invariant to names that run in
    ``shared_with``: it is reported, not executed again, except for the tier's ``unshared_seeds``. Errors name
    ``source`` (the suite file, when known) and the field. Each run's config is validated here, once: its stored
    dict (what records keep and run ids hash) and its typed form (``RunConfig``, what tasks read)."""
    where_suite = source or f"suite {suite.name}"
    spec = suite.tiers[tier]
    dataset = suite.dataset.model_dump()
    for key in ("train_subset", "test_subset", "generated"):
        if getattr(spec, key) is not None:
            dataset[key] = getattr(spec, key)
    train = {**suite.train.model_dump(), **spec.train}
    if spec.epochs is not None:
        train["epochs"] = spec.epochs
    task_options = TASKS.get(suite.task).Options.model_validate({**suite.task_options, **spec.task}).model_dump()
    grid = {**suite.grid, **(spec.grid or {})}
    normalizers = [n for n in suite.normalizers if spec.normalizers is None or n.column in spec.normalizers]
    runs = []
    first_of_execution: dict[str, str] = {}
    for backbone, normalizer, values, seed in itertools.product(
        spec.backbones or suite.backbones, normalizers, itertools.product(*grid.values()),
        spec.seeds or suite.seeds,
    ):
        config: dict[str, Any] = {
            "suite": suite.name, "suite_version": suite.version, "task": suite.task, "tier": tier,
            "dataset": dataset, "backbone": backbone,
            "normalizer": {"name": normalizer.name, "label": normalizer.column,
                           "options": {**normalizer.options, **spec.normalizer_options.get(normalizer.column, {})}},
            "model": suite.model.model_dump(), "seed": seed,
            "train": {**train, **spec.normalizer_train.get(normalizer.column, {})}, "task_options": dict(task_options),
        }
        config = json.loads(json.dumps(config))  # deep copy, and JSON-typed as it will be stored
        for key, value in zip(grid, values, strict=True):
            implied = suite.linked.get(key, {})
            if implied and value not in implied:
                raise UserError(f"{where_suite}: field linked.{key} has no entry for grid value {value!r}")
            for path, assigned in {key: value, **implied.get(value, {})}.items():
                section, _, field = path.partition(".")
                config[_SECTIONS[section]][field] = assigned
        validated: dict[str, Any] = {}
        for section, model in (("train", TrainConfig), ("task_options", TASKS.get(suite.task).Options),
                               ("model", ModelSpec)):
            try:
                validated[section] = resolved = model.model_validate(config[section])
            except ValidationError as err:
                where = ", ".join(f"{k}={v}" for k, v in zip(grid, values, strict=True)) or f"tier {tier}"
                first = err.errors()[0]
                field = ".".join(map(str, (section, *first["loc"])))
                raise UserError(f"{where_suite}: field {field} ({where}): {first['msg']}") from None
            config[section] = resolved.stored_dump() if isinstance(resolved, TrainConfig) else resolved.model_dump()
        setting = {"backbone": backbone, "normalizer": normalizer.column, **dict(zip(grid, values, strict=True)),
                   "seed": seed}
        if any(matches(setting, excluded) for excluded in suite.exclude):
            continue
        invariant = invariant_grid_keys(config, list(grid))
        if seed in spec.unshared_seeds:
            _measure_invariance(config, invariant)
            validated["train"] = validated["train"].model_copy(update=config["train"])  # the flag it may set
            invariant = []
        plugins = plugins_used(config)
        if plugins:  # only runs that use a plugin's thing: the ids of every other run stay as they were
            config["plugins"] = plugins
        run_id = run_id_of(config)
        primary = first_of_execution.setdefault(shared_execution_key(config, invariant), run_id) if invariant else None
        typed = RunConfig(task=suite.task, seed=seed, backbone=backbone,
                          normalizer=NormalizerChoice(**config["normalizer"]),
                          dataset=DatasetSpec.model_validate(config["dataset"]), **validated)
        runs.append(RunSpec(suite.name, suite.version, tier, run_id, config, setting, typed,
                            shared_with=primary if primary != run_id else None))
    return runs
