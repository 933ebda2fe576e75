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
from repro.suite.schema import Suite
from repro.suite.tasks import TASKS, RunSpec
from repro.train.config import TrainConfig

_SECTIONS = {"train": "train", "task": "task_options", "model": "model"}


def run_id_of(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def matches(setting: dict[str, Any], pattern: dict[str, Any]) -> bool:
    """Whether every ``column: value`` of ``pattern`` holds in ``setting`` (an ``exclude`` entry)."""
    return all(column in setting and setting[column] == value for column, value in pattern.items())


def expand(suite: Suite, tier: str) -> list[RunSpec]:
    """All runs of ``suite`` at ``tier``: backbones × normalizers × grid × seeds, in that nesting order, less the
    settings ``exclude`` names (a normalizer that does not apply to a backbone, a recipe for one model only)."""
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
    for backbone, normalizer, values, seed in itertools.product(
        spec.backbones or suite.backbones, normalizers, itertools.product(*grid.values()),
        spec.seeds or suite.seeds,
    ):
        config: dict[str, Any] = {
            "suite": suite.name, "suite_version": suite.version, "task": suite.task, "tier": tier,
            "dataset": dataset, "backbone": backbone,
            "normalizer": {"name": normalizer.name, "label": normalizer.column,
                           "options": {**normalizer.options, **spec.normalizer_options.get(normalizer.column, {})}},
            "model": suite.model.model_dump(), "seed": seed, "train": dict(train), "task_options": dict(task_options),
        }
        config = json.loads(json.dumps(config))  # deep copy, and JSON-typed as it will be stored
        for key, value in zip(grid, values, strict=True):
            implied = suite.linked.get(key, {})
            if implied and value not in implied:
                raise UserError(f"suite {suite.name}: field linked.{key} has no entry for grid value {value!r}")
            for path, assigned in {key: value, **implied.get(value, {})}.items():
                section, _, field = path.partition(".")
                config[_SECTIONS[section]][field] = assigned
        try:
            config["train"] = TrainConfig.model_validate(config["train"]).model_dump()
        except ValidationError as err:
            where = ", ".join(f"{k}={v}" for k, v in zip(grid, values, strict=True)) or f"tier {tier}"
            raise UserError(f"suite {suite.name}: field train ({where}): {err.errors()[0]['msg']}") from None
        setting = {"backbone": backbone, "normalizer": normalizer.column, **dict(zip(grid, values, strict=True)),
                   "seed": seed}
        if any(matches(setting, excluded) for excluded in suite.exclude):
            continue
        runs.append(RunSpec(suite.name, suite.version, tier, run_id_of(config), config, setting))
    return runs
