"""The trainer's settings, torch-free: the orchestrator's config imports them without the model stack."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.defaults import EVAL_BATCH_SIZE


class TrainConfig(BaseModel):
    """Optimisation settings of one packed training run: the `train` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(default=4, ge=1, description="Passes over each expert's training questions.")
    batch_size: int = Field(default=4, ge=1, description="Rows of each expert in one micro-batch.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(default=3e-3, gt=0, description="AdamW's learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's weight decay.")
    patience: int = Field(
        default=2, ge=1, description="Epochs with no better validation alignment before an expert stops."
    )
    seed: int = Field(
        default=0,
        description="Seeds each expert's batch order and the search's draws; sample i of a search uses seed+i.",
    )
    # A culture's ~15 validation questions pick among epochs by noise as much as by merit; six cultures' ~90
    # pick one epoch for all of them.
    select: Literal["expert", "group"] = Field(
        default="expert",
        description="The epoch each expert keeps: its own best on validation (expert), or the epoch best on "
        "the mean over every expert trained with it (group).",
    )
    # 1.4x fewer padded tokens on the survey's questions at 8.
    length_buckets: int = Field(
        default=8,
        ge=1,
        description="Each expert's epoch is cut into runs of this many batches, each run sorted by question "
        "length, so a batch pads little; 1 keeps the plain shuffle.",
    )
    # What an expert learns from one way of writing a question can be that way's letter habits, not the
    # culture: a draw among its renderings keeps only what survives them (docs/results.md).
    renderings: bool = Field(
        default=True,
        description="Each epoch, train on one rendering of each question drawn at random (missing-value "
        "codes dropped or kept, a scale numbered or not, either option order); false: as written.",
    )
    eval_batch_size: int = Field(
        default=EVAL_BATCH_SIZE, ge=1, description="Questions in one validation forward pass."
    )
    # The layers below keep their start (a culture's expert: the shared prior's), and backpropagation stops
    # at the lowest trained layer, so a step costs less the smaller K is.
    prefix_layers: int | None = Field(
        default=None,
        ge=1,
        description="Deep prompts: train only the top K layers' virtual keys and values. Null: every layer.",
    )

    @model_validator(mode="after")
    def _frozen_layers_stay(self) -> TrainConfig:
        if self.prefix_layers is not None and self.weight_decay > 0:
            raise ValueError(
                "train.prefix_layers keeps the lower prefix layers fixed, but weight_decay would still shrink "
                "them: set weight_decay to 0 or leave prefix_layers unset"
            )
        return self
