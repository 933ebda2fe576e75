"""A run's configuration, typed: validated once, when its suite is expanded (``repro.suite.expand``), and read by
field wherever the run runs.

The stored form stays beside it (``RunSpec.config``): the JSON dict a record keeps and a run id and a checkpoint
key hash, built exactly as before the typed form existed, so committed records, run ids and checkpoints stay
current. Code that starts from a record (the cost model's calibration, the memory task's child process) types its
stored config once with ``RunConfig.from_stored`` and reads fields from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from repro.train.config import TrainConfig


class DatasetSpec(BaseModel):
    """A suite's ``dataset:`` block, with its tier's subsets and ``generated``: what a run loads."""

    model_config = ConfigDict(extra="forbid")
    name: str
    source: Literal["auto", "local", "debian", "hub"] = "auto"
    revision: str | None = Field(default=None, description="hub commit to pin, when loading from the hub")
    train_subset: int | None = Field(default=None, ge=1)
    test_subset: int | None = Field(default=None, ge=1)
    generated: bool = Field(default=False, description="use a small generated copy in the real on-disk layout")


class ModelSpec(BaseModel):
    """A suite's ``model:`` block: how a backbone is built beyond its normalizer."""

    model_config = ConfigDict(extra="forbid")
    small_input: bool = False
    pretrained: str | None = Field(default=None, description="None, 'hub', or a local weights file")


@dataclass(frozen=True)
class NormalizerChoice:
    """The run's normalizer: registered ``name``, the suite's ``label`` for it, and its resolved ``options``."""

    name: str
    label: str
    options: dict[str, Any]


@dataclass(frozen=True)
class RunConfig:
    """What a task reads of its run's configuration. ``task_options`` is the task's own validated ``Options``."""

    task: str
    seed: int
    backbone: str
    normalizer: NormalizerChoice
    dataset: DatasetSpec
    model: ModelSpec
    train: TrainConfig
    task_options: BaseModel

    @classmethod
    def from_stored(cls, config: dict[str, Any], options: type[BaseModel]) -> RunConfig:
        """The typed form of a stored config (a record's ``config``), ``options`` being its task's ``Options``.
        Raises pydantic's ``ValidationError`` (or ``KeyError``) for a config this code's schema does not accept:
        a record written by an older version."""
        normalizer = config["normalizer"]
        return cls(task=config["task"], seed=config["seed"], backbone=config["backbone"],
                   normalizer=NormalizerChoice(normalizer["name"], normalizer.get("label", normalizer["name"]),
                                               normalizer["options"]),
                   dataset=DatasetSpec.model_validate(config["dataset"]),
                   model=ModelSpec.model_validate(config["model"]), train=TrainConfig.model_validate(config["train"]),
                   task_options=options.model_validate(config["task_options"]))
