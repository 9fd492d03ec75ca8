"""The experiment config: one YAML file, validated before anything heavy starts, with key=value overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.trainer import TrainConfig


class ConfigError(ValueError):
    """A config that cannot be used, said in one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelSection(Strict):
    name: str = "smollm2-135m"  # hub id, local folder, or an embedded name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"


class DataSection(Strict):
    path: str = "../shared/data/goqa/opinions.jsonl"  # relative to the working directory
    cultures: list[str] | None = None
    top: int | None = Field(default=None, ge=1)
    min_questions: int = Field(default=0, ge=0)
    held_out: list[str] = []
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    max_length: int = Field(default=320, ge=8)

    @model_validator(mode="after")
    def _one_selection(self) -> DataSection:
        if (self.cultures is None) == (self.top is None):
            raise ValueError("give exactly one of data.cultures or data.top")
        return self


class PromptSection(Strict):
    num_virtual_tokens: int = Field(default=8, ge=1, le=512)
    init: Literal["persona", "random"] = "persona"


class TrainSection(Strict):
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    patience: int = Field(default=2, ge=1)
    seed: int = 0
    eval_batch_size: int = Field(default=16, ge=1)

    def trainer_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump())


class TuneSection(Strict):
    experts_per_trial: int = Field(default=1, ge=1)  # cultures trained packed in one trial
    num_samples: int = Field(default=1, ge=1)  # draws of the search space per culture group
    search_space: dict[Literal["lr", "num_virtual_tokens", "weight_decay", "batch_size"], list[float]] = {}
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1)  # epochs before ASHA may stop a trial
    max_failures: int = Field(default=2, ge=0)  # retries of a trial whose worker died, from its checkpoint
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float | Literal["auto"] = "auto"  # auto: one GPU where the cluster has GPUs, else none


class MlflowSection(Strict):
    tracking_uri: str | None = None  # default: sqlite:///<output_dir>/mlflow.db
    artifact_root: str | None = None  # default: <output_dir>/mlartifacts
    experiment: str | None = None  # default: the config's name
    registry_prefix: str = "shores"  # registered models are <prefix>-<culture slug>
    retries: int = Field(default=3, ge=1)


class EvalSection(Strict):
    batch_size: int = Field(default=16, ge=1)
    bootstrap: int = Field(default=1000, ge=10)


class ExperimentConfig(Strict):
    """Everything one experiment needs; unknown keys are errors."""

    name: str = "shores"
    output_dir: str = "runs/shores"
    base_model: BaseModelSection = BaseModelSection()
    data: DataSection
    prompt: PromptSection = PromptSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    tune: TuneSection = TuneSection()
    mlflow: MlflowSection = MlflowSection()

    @property
    def experts_dir(self) -> Path:
        return Path(self.output_dir) / "experts"


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)  # so numbers, lists and null parse as YAML would


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML config, applying `key.sub=value` overrides first."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        _set(tree, key.strip(), value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{path}: {where}: {first['msg']}{more}") from None
