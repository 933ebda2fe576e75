"""Training hyperparameters, validated (a suite's ``train:`` block)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """One run's training recipe. ``lr`` is the learning rate at ``batch_size`` (no implicit scaling)."""

    model_config = ConfigDict(extra="forbid")

    #: fields added after records were committed: at their default they are left out of a run's stored (and so
    #: hashed) config (``stored_dump``), so existing run ids and checkpoint keys stay what they were
    HASH_NEUTRAL_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"amp_cpu", "sequential_micro_batches"})

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    eval_batch_size: int = Field(default=1000, ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = Field(default_factory=list, description="epochs at which 'step' multiplies lr by gamma")
    gamma: float = Field(default=0.1, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    mixup_alpha: float = Field(default=0.0, ge=0, description="0 disables mixup")
    micro_batch: int | None = Field(
        default=None, ge=1, description="images per normalization batch; None = the whole batch")
    sequential_micro_batches: bool = Field(
        default=False, description="a forward and backward per micro-batch (the arithmetic of data-parallel "
        "workers) even where one ghost-batch pass computes the same: a tier's unshared_seeds set it, so that a claim "
        "of a normalizer's invariance to the micro-batch compares two different computations")
    crop_padding: int = Field(default=0, ge=0)
    flip: bool = False
    amp: bool = Field(default=True, description="bf16 autocast on CUDA; ignored on CPU")
    # No compile option: torch.compile (inductor, CPU) of ResNet-20's forward and backward took 202 ms against 175
    # eager in float32 and 110 against 105 under bf16 autocast (2026-12-05, 1 thread, batch 128, AVX512-BF16).
    amp_cpu: bool = Field(default=False, description="bf16 autocast on CPU too, for CPUs with AVX512-BF16 (there "
                          "ResNet-20's BN step ran 1.57x faster)")
    channels_last: bool = Field(default=True, description="channels-last memory format (on CPU too: resnet20 "
                                "trains 1.4x faster with it on 2 threads)")
    max_steps_per_epoch: int | None = Field(default=None, ge=1, description="cap on optimizer steps per epoch")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs milestones")
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro_batch}")
        return self

    def stored_dump(self) -> dict[str, Any]:
        """``model_dump`` less the ``HASH_NEUTRAL_AT_DEFAULT`` fields that are at their default: a run's config."""
        dump = self.model_dump()
        return {name: value for name, value in dump.items()
                if not (name in self.HASH_NEUTRAL_AT_DEFAULT and value == type(self).model_fields[name].default)}
