"""Checks of a suite against the registries and its own axes, beyond what the schema can express."""

from __future__ import annotations

from pathlib import Path

import timm
from pydantic import BaseModel, ValidationError

from repro.data import DATASETS
from repro.errors import UserError
from repro.norms import NORMALIZERS, create_normalizer
from repro.suite.expand import expand, matches, tier_settings
from repro.suite.schema import ModelSpec, Suite
from repro.tasks.base import TASKS
from repro.train.config import TrainConfig


def _fail(path: Path, field: str, message: str) -> UserError:
    return UserError(f"{path}: field {field}: {message}")


def _check_field_path(path: Path, where: str, key: str, task_options: type[BaseModel]) -> None:
    """A ``train.<field>``, ``task.<field>`` or ``model.<field>`` path (grid and linked keys) names a real field."""
    section, _, field = key.partition(".")
    fields = {"train": TrainConfig.model_fields, "task": task_options.model_fields,
              "model": ModelSpec.model_fields}.get(section)
    if fields is None:
        raise _fail(path, where, "must be train.<field>, task.<field> or model.<field>")
    if field not in fields:
        raise _fail(path, where, f"unknown {section} field {field!r}; allowed: {', '.join(fields)}")


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
            _check_field_path(path, f"grid.{key}", key, task_options)
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
    for key, by_value in suite.linked.items():
        for value, fields in by_value.items():
            for field in fields:
                _check_field_path(path, f"linked.{key}.{value}.{field}", field, task_options)
    columns = {*setting_columns(suite), *TASKS.get(suite.task).extra_columns}
    all_settings = [setting for tier in suite.tiers for setting in tier_settings(suite, tier)]
    for i, excluded in enumerate(suite.exclude):
        unknown = set(excluded) - columns - {"seed"}
        if unknown:
            raise _fail(path, f"exclude.{i}", f"unknown setting column {sorted(unknown)[0]!r}; "
                        f"allowed: {', '.join(sorted(columns | {'seed'}))}")
        if not any(matches(setting, excluded) for setting in all_settings):
            raise _fail(path, f"exclude.{i}", f"{excluded} matches no setting of any tier (a typo?)")
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
            run_settings = [run.setting for run in expand(suite, tier, source=str(path))]
            for setting in settings:
                own = {k: v for k, v in setting.items() if k in run_settings[0]} if run_settings else setting
                if not any(matches(run, own) for run in run_settings):
                    raise _fail(path, f"references.{i}", f"{ref.id}: setting {own} matches no run of tier {tier!r}; "
                                "it could never be checked")
    for name in suite.tiers:
        expand(suite, name, source=str(path))
    axes = columns | {"seed"}
    for i, plot in enumerate(suite.plots):
        for field, column in (("x", plot.x), ("line", plot.line), *(("where", c) for c in plot.where)):
            if column not in axes:
                allowed = ", ".join(sorted(axes))
                raise _fail(path, f"plots.{i}.{field}", f"unknown column {column!r}; allowed: {allowed}")
    ids = [ref.id for ref in suite.references]
    if len(set(ids)) != len(ids):
        raise _fail(path, "references", "reference ids must be unique")
