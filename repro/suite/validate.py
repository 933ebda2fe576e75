"""Checks of a suite against the registries and its own axes, beyond what the schema can express."""

from __future__ import annotations

from pathlib import Path

import timm
from pydantic import ValidationError

from repro.data import DATASETS
from repro.errors import UserError
from repro.norms import NORMALIZERS, create_normalizer
from repro.suite.schema import Suite
from repro.tasks.base import TASKS
from repro.train.config import TrainConfig


def _fail(path: Path, field: str, message: str) -> UserError:
    return UserError(f"{path}: field {field}: {message}")


def setting_columns(suite: Suite) -> list[str]:
    """Columns that identify a setting in tables and references (the seed is aggregated over)."""
    return ["backbone", "normalizer", *suite.grid]


def check_registries(suite: Suite, path: Path) -> None:
    if suite.task not in TASKS:
        raise _fail(path, "task", f"unknown task {suite.task!r}; allowed: {', '.join(TASKS.names())}")
    if suite.dataset.name not in DATASETS:
        raise _fail(path, "dataset.name", f"unknown dataset {suite.dataset.name!r}; allowed: {', '.join(DATASETS)}")
    backbones = set(suite.backbones)
    for tier in suite.tiers.values():
        backbones.update(tier.backbones or [])
    for backbone in sorted(backbones):
        if not timm.is_model(backbone.split(".")[0]):
            raise _fail(path, "backbones", f"unknown backbone {backbone!r}; allowed: any timm model name")
    labels = []
    for i, spec in enumerate(suite.normalizers):
        if spec.name not in NORMALIZERS:
            allowed = ", ".join(NORMALIZERS)
            raise _fail(path, f"normalizers.{i}", f"unknown normalizer {spec.name!r}; allowed: {allowed}")
        try:
            create_normalizer(spec.name, **spec.options)
        except UserError as err:
            raise _fail(path, f"normalizers.{i}.options", str(err)) from None
        labels.append(spec.column)
    if len(set(labels)) != len(labels):
        raise _fail(path, "normalizers", "two normalizers share a label; give them distinct `label`s")
    task_options = TASKS.get(suite.task).Options
    try:
        task_options.model_validate(suite.task_options)
    except ValidationError as err:
        first = err.errors()[0]
        raise _fail(path, "task_options." + ".".join(map(str, first["loc"])), first["msg"]) from None
    for name, tier in suite.tiers.items():
        for spec in suite.normalizers:
            if spec.column in tier.normalizer_options:
                try:
                    create_normalizer(spec.name, **{**spec.options, **tier.normalizer_options[spec.column]})
                except UserError as err:
                    raise _fail(path, f"tiers.{name}.normalizer_options.{spec.column}", str(err)) from None
        grid = {**suite.grid, **(tier.grid or {})}
        for key in grid:
            section, _, field = key.partition(".")
            fields = {"train": TrainConfig.model_fields, "task": task_options.model_fields}.get(section)
            if fields is not None and field not in fields:
                raise _fail(path, f"grid.{key}", f"unknown {section} field; allowed: {', '.join(fields)}")
        for section, overrides, model in (("train", tier.train, TrainConfig), ("task", tier.task, task_options)):
            unknown = set(overrides) - set(model.model_fields)
            if unknown:
                allowed = ", ".join(model.model_fields)
                raise _fail(path, f"tiers.{name}.{section}", f"unknown key {sorted(unknown)[0]}; allowed: {allowed}")
        try:
            TrainConfig.model_validate({**suite.train.model_dump(), **tier.train})
            task_options.model_validate({**suite.task_options, **tier.task})
        except ValidationError as err:
            first = err.errors()[0]
            raise _fail(path, f"tiers.{name}", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    columns = {*setting_columns(suite), *TASKS.get(suite.task).extra_columns}
    for i, excluded in enumerate(suite.exclude):
        unknown = set(excluded) - columns - {"seed"}
        if unknown:
            raise _fail(path, f"exclude.{i}", f"unknown setting column {sorted(unknown)[0]!r}; "
                        f"allowed: {', '.join(sorted(columns | {'seed'}))}")
    for i, ref in enumerate(suite.references):
        settings = [ref.setting] if ref.kind == "absolute" else [ref.a, ref.b]
        for setting in settings:
            unknown = set(setting) - columns
            if unknown:
                raise _fail(path, f"references.{i}", f"unknown setting column {sorted(unknown)[0]!r}; "
                            f"allowed: {', '.join(sorted(columns))}")
        for tier in ref.tiers:
            if tier not in suite.tiers:
                raise _fail(path, f"references.{i}.tiers", f"unknown tier {tier!r}; allowed: {', '.join(suite.tiers)}")
    ids = [ref.id for ref in suite.references]
    if len(set(ids)) != len(ids):
        raise _fail(path, "references", "reference ids must be unique")
