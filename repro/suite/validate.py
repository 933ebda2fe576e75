"""Checks of a suite against the registries and its own axes, beyond what the schema can express."""

from __future__ import annotations

import math
from pathlib import Path

import timm
from pydantic import BaseModel, ValidationError

from repro.data import DATASETS
from repro.errors import UserError
from repro.norms import NORMALIZERS, create_normalizer
from repro.suite.expand import expand, matches, tier_settings
from repro.suite.schema import AbsoluteReference, RelativeReference, Suite
from repro.tasks.base import TASKS
from repro.tasks.config import ModelSpec
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
        sections = [("train", tier.train, TrainConfig), ("task", tier.task, task_options),
                    *((f"normalizer_train.{label}", overrides, TrainConfig)
                      for label, overrides in tier.normalizer_train.items())]
        for section, overrides, model in sections:
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
            runs = expand(suite, tier, source=str(path))
            for setting in settings:
                own = {k: v for k, v in setting.items() if k in runs[0].setting} if runs else setting
                matched = [run for run in runs if matches(run.setting, own)]
                if not matched:
                    raise _fail(path, f"references.{i}", f"{ref.id}: setting {own} matches no run of tier {tier!r}; "
                                "it could never be checked")
                _check_row_keys(path, i, ref.id, tier, {k: v for k, v in setting.items() if k not in own}, matched)
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


def _check_row_keys(path: Path, i: int, ref_id: str, tier: str, row: dict, runs: list) -> None:
    """A reference's row-level keys (a TTA method, corruption, severity, batch size) name a row that some run of
    the tier matching the rest of its setting writes; else it would stay ``not run`` forever."""
    if not row:
        return
    identities: dict[str, list[dict]] = {}
    for run in runs:  # runs of one tier mostly share their task options: each distinct one is listed once
        key = run.typed_config.task_options.model_dump_json()
        if key not in identities:
            identities[key] = TASKS.get(run.typed_config.task).row_identities(run.typed_config)
    rows = [identity for listed in identities.values() for identity in listed]
    if any(matches(identity, row) for identity in rows):
        return
    for column, value in row.items():  # name the first key whose value no row has, with what is allowed
        values = sorted({identity.get(column) for identity in rows}, key=str)
        if not any(matches(identity, {column: value}) for identity in rows):
            raise _fail(path, f"references.{i}", f"{ref_id}: {column} {value!r} is in no row of tier {tier!r}; "
                        f"allowed: {', '.join(map(str, values))}")
    raise _fail(path, f"references.{i}", f"{ref_id}: no row of tier {tier!r} has {row} together")


#: metrics that are percentages in [0, 100]: a difference a − b of two lies in [−100, 100]
PERCENT_METRICS = frozenset({"top1", "best_top1", "top1_error", "error", "mean_error", "mean_error_s5", "ece",
                             "mean_ece", "top1_float", "top1_quantized", "flipped_pct"})
#: metrics that are never negative (percentages, memory, times, rates, mCE): a change in % of b is at least −100
NON_NEGATIVE_METRICS = PERCENT_METRICS | {"peak_memory_mb", "step_memory_mb", "memory_before_mb", "step_time_ms",
                                          "step_cpu_ms", "images_per_s", "micro_step_ms", "bn_micro_step_ms",
                                          "step_time_vs_bn", "mce", "loss"}
_TOLERANCE_SOURCES = ("paper_std (with paper_std:), seed_spread (a note or noise_floor saying where it was measured), "
                      "measurement (a note naming the difference), exact (tolerance 0)")


def check_references(suite: Suite, path: Path) -> None:
    """What the schema cannot see in the references: a tolerance that does not say where it comes from or admits
    every value, a claim that no outcome can violate, and references that cannot tell apart, or cannot all pass
    for, two settings a claim orders."""
    for i, ref in enumerate(suite.references):
        if isinstance(ref, AbsoluteReference):
            _check_absolute(path, i, ref)
        else:
            _check_relative(path, i, ref)
    _check_against_claims(suite, path)


def _check_absolute(path: Path, i: int, ref: AbsoluteReference) -> None:
    if not math.isfinite(ref.value):
        raise _fail(path, f"references.{i}.value", f"{ref.id}: must be a finite number (got {ref.value})")
    if not math.isfinite(ref.tolerance):
        raise _fail(path, f"references.{i}.tolerance", f"{ref.id}: {ref.tolerance} admits every value, so the "
                    "reference checks nothing; allowed: a finite tolerance")
    where = f"references.{i}.tolerance_from"
    if ref.tolerance_from is None:
        raise _fail(path, where, f"{ref.id}: required: where the tolerance {ref.tolerance:g} comes from; allowed: "
                    f"{_TOLERANCE_SOURCES}")
    if (ref.tolerance == 0) != (ref.tolerance_from == "exact"):
        raise _fail(path, where, f"{ref.id}: exact goes with tolerance 0 and only with it (got {ref.tolerance_from} "
                    f"with tolerance {ref.tolerance:g})")
    if ref.tolerance_from == "paper_std" and ref.paper_std is None:
        raise _fail(path, f"references.{i}.paper_std", f"{ref.id}: required by tolerance_from paper_std")
    if ref.tolerance_from == "measurement" and not ref.note.strip():
        raise _fail(path, f"references.{i}.note", f"{ref.id}: tolerance_from measurement needs a note naming the "
                    "difference between what is measured here and in the source")
    if ref.tolerance_from == "seed_spread" and not (ref.note.strip() or ref.noise_floor):
        raise _fail(path, f"references.{i}.note", f"{ref.id}: tolerance_from seed_spread needs a note or a "
                    "noise_floor saying where the spread was measured")


def _vacuous_bound(ref: RelativeReference, bound: str) -> str | None:
    """Why ``ref``'s ``bound`` (min or max) cannot be violated by any outcome, or None."""
    value = getattr(ref, bound)
    if value is None:
        return None
    if not math.isfinite(value):
        return f"{value} cannot be violated (or compared); allowed: a finite bound, or none"
    if ref.percent:
        if bound == "min" and value <= -100 and ref.metric in NON_NEGATIVE_METRICS:
            return (f"{value:g} cannot be violated: a change in % of b of {ref.metric}, which is never negative, is "
                    "at least -100; allowed: a min above -100, or none")
        return None
    if ref.metric in PERCENT_METRICS and (value <= -100 if bound == "min" else value >= 100):
        return (f"{value:g} cannot be violated: a − b of {ref.metric}, a percentage, lies in [-100, 100]; allowed: "
                "a bound inside (-100, 100), or none")
    return None


def _check_relative(path: Path, i: int, ref: RelativeReference) -> None:
    if ref.a == ref.b:
        raise _fail(path, f"references.{i}.b", f"{ref.id}: equals a ({ref.a}): the claim compares a setting with "
                    "itself; allowed: a setting that differs from a")
    for bound in ("min", "max"):
        why = _vacuous_bound(ref, bound)
        if why:
            raise _fail(path, f"references.{i}.{bound}", f"{ref.id}: {why}")


def _orders(ref: RelativeReference) -> bool:
    """The claim says its two settings differ in a direction (a ≤ b or a ≥ b), not merely that they are close."""
    return (ref.max is not None and ref.max <= 0) or (ref.min is not None and ref.min >= 0)


def _bounds(ref: RelativeReference) -> str:
    return f"[{'-inf' if ref.min is None else f'{ref.min:g}'}, {'+inf' if ref.max is None else f'{ref.max:g}'}]"


def _difference_range(a: AbsoluteReference, b: AbsoluteReference, percent: bool) -> tuple[float, float]:
    """The range of a − b (or of 100·(a − b)/b) over all values that pass both absolute references."""
    a_low, a_high = a.value - a.tolerance, a.value + a.tolerance
    b_low, b_high = b.value - b.tolerance, b.value + b.tolerance
    if not percent:
        return a_low - b_high, a_high - b_low
    high = 100 * (a_high / b_low - 1) if b_low > 0 else math.inf
    return 100 * (a_low / b_high - 1), high


def _absolute_at(suite: Suite, claim: RelativeReference, setting: dict) -> list[tuple[int, AbsoluteReference]]:
    """The absolute references (with their index) of the claim's metric at exactly ``setting``, in a claim's tier."""
    return [(i, ref) for i, ref in enumerate(suite.references) if isinstance(ref, AbsoluteReference)
            and ref.metric == claim.metric and ref.setting == setting and set(ref.tiers) & set(claim.tiers)]


def _check_against_claims(suite: Suite, path: Path) -> None:
    """For each claim that orders its settings a and b, the absolute references of the same metric at exactly
    those settings (sharing a tier with the claim and each other): they must be able to pass together with the
    claim, and neither's tolerance may hold the other's value inside it, or a reproduction of b's number passes
    a's reference. A value on the edge is allowed: a reproduction there straddles the bound, never passes.

    Claims that two settings are close (min < 0 < max, or "a within 1 point of b") are left alone: there the
    papers' own numbers may agree to within any tolerance (MimicNorm's and BN's accuracies)."""
    for c, claim in enumerate(suite.references):
        if isinstance(claim, AbsoluteReference) or not _orders(claim):
            continue
        pairs = [(pa, pb) for pa in _absolute_at(suite, claim, claim.a) for pb in _absolute_at(suite, claim, claim.b)
                 if set(pa[1].tiers) & set(pb[1].tiers)]
        for (i, a), (j, b) in pairs:
            low, high = _difference_range(a, b, claim.percent)
            if (claim.min is not None and high < claim.min) or (claim.max is not None and low > claim.max):
                unit = " in % of b" if claim.percent else ""
                raise _fail(path, f"references.{c}", f"{claim.id} cannot pass while {a.id} and {b.id} do: their "
                            f"values ± tolerances put a − b{unit} in [{low:.4g}, {high:.4g}], outside the claim's "
                            f"{_bounds(claim)}; their protocols differ, or one of them is not this suite's")
            gap = abs(a.value - b.value)
            for k, wide, other in ((i, a, b), (j, b, a)):
                if wide.tolerance > gap:
                    raise _fail(path, f"references.{k}.tolerance", f"{wide.id}: {wide.value:g} ± {wide.tolerance:g} "
                                f"admits {other.id}'s {other.value:g}, yet {claim.id} says the two settings differ: "
                                f"the tolerance cannot tell them apart; allowed: below {gap:.4g}")
