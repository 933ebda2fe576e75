"""The suite file format: one YAML file per pinned reproduction, validated on load.

A suite expands into runs: ``backbones × normalizers × seeds × grid``, each resolved with the chosen tier's
overrides. References are either absolute numbers from a paper or relative claims between two settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from repro.tasks.config import DatasetSpec, ModelSpec
from repro.train.config import TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NormalizerSpec(_Strict):
    """A normalizer by registered name, its options, and the label it gets in tables (default: the name)."""

    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def column(self) -> str:
        return self.label or self.name


class TierSpec(_Strict):
    """What a tier changes relative to the suite's full recipe."""

    description: str = ""
    epochs: int | None = Field(default=None, ge=1)
    train_subset: int | None = Field(default=None, ge=1)
    test_subset: int | None = Field(default=None, ge=1)
    seeds: list[int] | None = Field(default=None, min_length=1)
    backbones: list[str] | None = Field(default=None, min_length=1)
    normalizers: list[str] | None = Field(
        default=None, description="labels of the suite's normalizers this tier runs (default: all of them)")
    expected_minutes: float | None = Field(
        default=None, gt=0, description="wall time of the whole tier on 2 CPU cores, shown by `repro list` (measured "
        "where it was run; the README says which)")
    generated: bool | None = None
    grid: dict[str, list[Any]] | None = None
    normalizer_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options merged into a normalizer's, by its label (e.g. GN groups that "
        "suit the tier's smaller backbone)")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of train fields")
    normalizer_train: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="overrides of train fields for one normalizer, by its label, on top of "
        "`train` (e.g. a precision whose numbers it does not keep)")
    task: dict[str, Any] = Field(default_factory=dict, description="overrides of task option fields")
    unshared_seeds: list[int] = Field(
        default_factory=list, description="seeds whose runs execute even where their normalizer is invariant to a "
        "grid key (Normalizer.invariant_to), so that a claim of that invariance measures something")


class NoiseFloor(_Strict):
    """The std of one run (absolute) or of one paired difference a − b (relative), measured elsewhere, on which a
    single-seed reference may rest; ``measured`` says where (an experiment, a suite, a tier)."""

    std: float = Field(ge=0)
    measured: str = Field(min_length=1)


_CONFIDENCE = Field(default=0.95, gt=0, lt=1, description="level of the interval the verdict is judged on")
_COLLAPSED_AS = Field(
    default=None, description="value a collapsed run (finished at chance, loss near ln C) counts as; None: its "
    "own value")
_NOISE_FLOOR = Field(default=None, description="std to rest a single-seed verdict on, and where it was measured")


class AbsoluteReference(_Strict):
    """A number a paper reports; passes when the confidence interval of the reproduced mean lies within
    ``value`` ± ``tolerance`` (``confidence`` here is the provenance tag; the interval's level is
    ``confidence_level``)."""

    kind: Literal["absolute"]
    id: str
    metric: str
    value: float
    tolerance: float = Field(ge=0)
    setting: dict[str, Any]
    source: str
    confidence: Literal["P", "A", "T", "S", "R", "U"] = Field(
        description="provenance tag: P, A, T, S as in shared/reference/paper_numbers.md; R for a bound or value of "
        "repro's own derivation (its analysis, not the paper's); U for an unverified lead (paper_numbers.md's "
        "appendix), a soft target only")
    tolerance_from: Literal["paper_std", "seed_spread", "measurement", "exact"] | None = Field(
        default=None, description="where the tolerance comes from (required in suite files): the paper's std "
        "(paper_std set), our seed spread (note or noise_floor says where measured), a measurement difference the "
        "note names (allocator peak vs nvidia-smi, other weights, another image subset), or exact (tolerance 0: a "
        "count or flag)")
    tiers: list[str] = Field(default_factory=lambda: ["full"])
    note: str = ""
    paper_std: float | None = Field(default=None, ge=0, description="the std the paper reports with the value")
    confidence_level: float = _CONFIDENCE
    noise_floor: NoiseFloor | None = _NOISE_FLOOR
    collapsed_as: float | None = _COLLAPSED_AS


class RelativeReference(_Strict):
    """A claim between two settings, ``min <= a - b <= max`` for the mean difference paired by seed (or that
    difference in percent of b), judged on its confidence interval; it can be checked on any dataset."""

    kind: Literal["relative"]
    id: str
    claim: str
    metric: str
    a: dict[str, Any]
    b: dict[str, Any]
    min: float | None = None
    max: float | None = None
    diverged_as: float | Literal["best_before"] | None = Field(
        default=None, description="value a diverged run counts as: a number (e.g. chance accuracy), or "
        "'best_before' (metric best_top1): its best test top-1 before it diverged, the measure of papers that report "
        "the best accuracy reached, chance when it diverged before its first evaluation; None leaves it out")
    must_not_diverge: list[Literal["a", "b"]] = Field(
        default_factory=list, description="sides whose diverged runs fail the claim (e.g. [a] for 'a trains where b "
        "fails'), instead of counting as diverged_as says")
    percent: bool = Field(
        default=False, description="compare 100 * (mean(a) - mean(b)) / mean(b), for claims like '20% less memory'")
    sigmas: float | None = Field(
        default=None, ge=0, description="judge on mean ± sigmas·SE of the paired per-seed differences instead of "
        "the t-interval (needs 2+ seeds that both settings ran)")
    confidence: float = _CONFIDENCE
    noise_floor: NoiseFloor | None = _NOISE_FLOOR
    collapsed_as: float | None = _COLLAPSED_AS
    source: str
    tiers: list[str] = Field(default_factory=lambda: ["full"])

    @model_validator(mode="after")
    def _bounded(self) -> RelativeReference:
        if self.min is None and self.max is None:
            raise ValueError("a relative claim needs min, max or both")
        return self

    @model_validator(mode="after")
    def _best_before_reads_best_top1(self) -> RelativeReference:
        if self.diverged_as == "best_before" and self.metric != "best_top1":
            raise ValueError(f"diverged_as: best_before counts a diverged run at its best top-1, so the claim's "
                             f"metric must be best_top1, not {self.metric!r}")
        return self


Reference = Annotated[AbsoluteReference | RelativeReference, Field(discriminator="kind")]


class PlotSpec(_Strict):
    """A line plot written by ``repro gather``: ``y`` against ``x``, one line per value of ``line``."""

    name: str
    x: str
    y: str
    line: str
    where: dict[str, Any] = Field(default_factory=dict)
    logx: bool = False


class Suite(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="a slug: it names the records' folder")
    version: int = Field(ge=1)
    description: str
    citation: str
    plugins: list[str] = Field(
        default_factory=list, description="modules that register what the suite names (repro.registry), imported "
        "before the suite is checked against the registries")
    task: str = "train"
    dataset: DatasetSpec
    backbones: list[str] = Field(min_length=1)
    normalizers: list[NormalizerSpec] = Field(min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    seeds: list[int] = Field(min_length=1)
    train: TrainConfig
    task_options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    linked: dict[str, dict[Any, dict[str, Any]]] = Field(
        default_factory=dict, description="fields a grid value implies: {grid key: {value: {train.<field>: ...}}}, "
        "e.g. the batch size and linearly scaled learning rate that go with each number of images per device")
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="settings not to run, e.g. {backbone: mobilenetv2_050, normalizer: fixup}")
    tiers: dict[str, TierSpec]
    references: list[Reference] = Field(default_factory=list)
    plots: list[PlotSpec] = Field(default_factory=list)

    @field_validator("normalizers", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("tiers")
    @classmethod
    def _has_smoke_and_full(cls, tiers: dict[str, TierSpec]) -> dict[str, TierSpec]:
        missing = {"smoke", "full"} - set(tiers)
        if missing:
            raise ValueError(f"tiers must define smoke and full (missing: {', '.join(sorted(missing))})")
        return tiers

    @model_validator(mode="after")
    def _tier_normalizers_exist(self) -> Suite:
        labels = [n.column for n in self.normalizers]
        for name, tier in self.tiers.items():
            for field in ("normalizer_options", "normalizer_train", "normalizers"):
                unknown = sorted(set(getattr(tier, field) or ()) - set(labels))
                if unknown:
                    raise ValueError(f"tiers.{name}.{field}: unknown normalizer {unknown[0]!r}; "
                                     f"allowed: {', '.join(labels)}")
        return self

    @model_validator(mode="after")
    def _linked_to_grid_keys(self) -> Suite:
        grid_keys = {*self.grid, *(key for tier in self.tiers.values() for key in tier.grid or {})}
        for key, by_value in self.linked.items():
            if key not in grid_keys:
                raise ValueError(f"linked.{key}: not a grid key; allowed: {', '.join(sorted(grid_keys)) or 'none'}")
            for fields in by_value.values():
                bad = [f for f in fields if f.split(".")[0] not in ("train", "task", "model") or f in grid_keys]
                if bad:
                    raise ValueError(f"linked.{key}: {bad[0]!r} must be a train.*, task.* or model.* field that is "
                                     "not itself a grid key")
        return self

    @field_validator("grid")
    @classmethod
    def _grid_paths(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if key.split(".")[0] not in ("train", "task", "model") or "." not in key:
                raise ValueError(f"grid key {key!r} must be train.<field>, task.<field> or model.<field>")
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return grid
