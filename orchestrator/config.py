"""The experiment config: one YAML file, validated before anything heavy starts, with key=value overrides.

A file may `extends: <file>` (relative to itself): the base's keys lie under the file's own, section by section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from serve.settings import ServeSection
from workers.cultures import SHARED, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH, SPLIT_FRACTIONS
from workers.settings import TrainConfig


class ConfigError(ValueError):
    """A config that cannot be used, said in one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelSection(Strict):
    """The frozen language model every expert is trained on and served with."""

    name: str = Field(
        default="smollm2-135m",
        description="A Hugging Face hub id, a local folder, or an embedded name: `smollm2-135m`, `gemma3-270m`.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="The weights' dtype, in training, evaluation and serving."
    )
    device: str = Field(
        default="auto", description="`auto`: the GPU this process was given if there is one, else the CPU."
    )


MIN_QUESTIONS = 30  # a culture's questions for an expert of its own, when the cultures are not named


class TransferSection(Strict):
    """A transfer split: one survey programme's questions kept out of training, selection and test."""

    hold_out: Literal["pew", "wvs"] = Field(
        description="The programme held out (`orchestrator/survey/programmes.py`): pew (Pew Global "
        "Attitudes, coded DK/Refused) or wvs (World Values Survey / EVS, coded Don't know, No answer, Missing)."
    )
    val: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="The held-out questions' share in transfer_val (for choosing); the rest are transfer_test.",
    )


class DataSection(Strict):
    """The survey file, which cultures get experts, and the split of its questions."""

    path: str = Field(
        default="../shared/data/goqa/opinions.jsonl",
        description="The GlobalOpinionQA JSONL file, relative to the working directory.",
    )
    # At most one of cultures and top: the others are answered by committees of similar cultures.
    cultures: list[str] | None = Field(
        default=None,
        description="The cultures that get experts. Null: the `top` N, or every culture with `min_questions`.",
    )
    top: int | None = Field(
        default=None, ge=1, description="The N cultures with the most questions get experts."
    )
    min_questions: int | None = Field(
        default=None,
        ge=0,
        description="The questions a culture needs for an expert. Null: 30 when the cultures are chosen "
        "(52 of the survey's 130 countries), none for named ones.",
    )

    @property
    def question_floor(self) -> int:
        """The questions a trained culture needs: `min_questions`, else 30 unless the cultures are named."""
        if self.min_questions is not None:
            return self.min_questions
        return 0 if self.cultures is not None else MIN_QUESTIONS

    held_out: list[str] = Field(
        default=[], description="Cultures kept out of training, answered and evaluated by committees."
    )
    split: tuple[float, float, float] = Field(
        default=SPLIT_FRACTIONS, description="The train, validation and test shares of the questions."
    )
    split_salt: str = Field(
        default="", description="Mixed into each question's hash: another salt is another split."
    )
    max_length: int = Field(
        default=MAX_LENGTH, ge=8, description="Tokens of an encoded question; a longer one keeps its end."
    )
    transfer: TransferSection | None = Field(
        default=None,
        description="Hold one survey programme's questions out of train/val/test, split into transfer_val "
        "and transfer_test. Null: every question splits into train/val/test.",
    )

    @model_validator(mode="after")
    def _one_selection(self) -> DataSection:
        if self.cultures is not None and self.top is not None:
            raise ValueError("give at most one of data.cultures or data.top")
        return self


class Overrides(Strict):
    """Some of a settings model's fields, set to replace its values; a field not given is not replaced."""

    @model_serializer(mode="wrap")
    def _given_only(self, handler) -> dict[str, Any]:
        # Only what was given: written out and read back (<output_dir>/config.yaml), it overrides the same keys.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    def over(self, settings: BaseModel) -> BaseModel:
        """`settings` with these values in place of its own, validated as `settings` is."""
        return type(settings).model_validate(settings.model_dump() | self.model_dump())


def overrides_of(model: type[BaseModel]) -> type[Overrides]:
    """An `Overrides` model with every field of `model`, each optional, with the same bounds and description."""
    fields = {
        name: (
            Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation,
            Field(default=None, description=info.description),
        )
        for name, info in model.model_fields.items()
    }
    # TrainConfig's is TrainOverrides: the name it is bound to here, so pickle finds the class.
    title = model.__name__.removesuffix("Config") + "Overrides"
    return create_model(title, __base__=Overrides, __module__=__name__, **fields)


TrainOverrides = overrides_of(TrainConfig)


class SharedSection(Strict):
    """The shared survey prior: one culture-blind expert named `shared`, trained on every country's answers."""

    enabled: bool = Field(
        default=False,
        description="Train the prior; its column in every report is the baseline experts must beat.",
    )
    max_questions: int | None = Field(
        default=None,
        ge=1,
        description="The prior's training questions (each one's answers pooled over its countries). Null: all.",
    )
    # The prior's trial trains alone when it comes first (prompt.init: shared): it may take every CPU.
    cpus_per_trial: float | None = Field(
        default=None, gt=0, description="CPUs of the prior's trial. Null: `tune.cpus_per_trial`."
    )
    # It has ~15x a culture's rows: bigger batches pay.
    train: TrainOverrides = Field(
        default=TrainOverrides(),
        description="The prior's own `train` settings, each in place of `train`'s (e.g. batch_size, epochs).",
    )
    expert_prior_weight: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None,
        description="The prior's share w in each culture's answers, (1 - w) expert + w prior, written into the "
        "expert file at training. auto: per culture, the w of 0, 0.1, ..., 1 whose worst rendering of the "
        "culture's val questions (codes dropped, order reversed, scale numbered) scores best. "
        "Null: 0, the expert alone.",
    )


class PromptSection(Strict):
    """What a culture's expert is: its kind, its length and where it starts."""

    kind: Literal["input", "deep"] = Field(
        default="input",
        description="input: soft tokens before the text (prompt tuning); "
        "deep: virtual keys and values at every layer (prefix tuning).",
    )
    num_virtual_tokens: int = Field(
        default=8, ge=1, le=512, description="The expert's length in virtual tokens, of the kind chosen."
    )
    init: Literal["persona", "random", "shared"] = Field(
        default="persona",
        description="persona: the encoding of a text describing the culture; random; "
        "shared: a copy of the shared prior, trained first (needs shared.enabled).",
    )


SearchKey = Literal["lr", "num_virtual_tokens", "weight_decay", "batch_size"]
INT_SEARCH_KEYS = ("num_virtual_tokens", "batch_size")


class Sampler(Strict):
    """One hyperparameter's search, in Tune's forms: exactly one of grid, choice, uniform, loguniform."""

    grid: list[float] | None = Field(default=None, description="Every value, crossed with the other grids.")
    choice: list[float] | None = Field(default=None, description="One value drawn per sample.")
    uniform: tuple[float, float] | None = Field(default=None, description="Low and high of a uniform draw.")
    loguniform: tuple[float, float] | None = Field(
        default=None, description="Low and high of a log-uniform draw, both above 0."
    )

    @model_validator(mode="after")
    def _one_form(self) -> Sampler:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform")
        values = getattr(self, given[0])
        if not values:
            raise ValueError(f"{given[0]} is empty")
        if given[0] in ("uniform", "loguniform") and not values[0] < values[1]:
            raise ValueError(f"{given[0]}: low must be below high")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform: low must be above 0")
        return self

    @property
    def form(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def bounds(self) -> list[float]:
        """Every value of a grid or choice, or a distribution's low and high: the values validation checks."""
        return list(getattr(self, self.form))


class TuneSection(Strict):
    """How Ray Tune runs the trials: packing, search, scheduling and resources."""

    experts_per_trial: int = Field(default=1, ge=1, description="Cultures trained packed in one trial.")
    num_samples: int = Field(
        default=1, ge=1, description="Draws of the search space per culture group, with seeds seed+i."
    )
    search_space: dict[SearchKey, Sampler] = Field(
        default={},
        description="Per key (lr, num_virtual_tokens, weight_decay, batch_size): a list (a grid) or "
        "{grid|choice|uniform|loguniform: ...}, Tune's sampling form of that name.",
    )
    scheduler: Literal["asha", "fifo"] = Field(
        default="asha",
        description="asha stops trials early on validation alignment; fifo runs every trial out.",
    )
    grace_period: int = Field(default=1, ge=1, description="Epochs before ASHA may stop a trial.")
    max_failures: int = Field(
        default=2, ge=0, description="Retries of a trial whose worker died, from its last checkpoint."
    )
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="Trials running at once. Null: as many as the resources allow."
    )
    cpus_per_trial: float = Field(default=1.0, gt=0, description="CPUs of one trial.")
    gpus_per_trial: float | Literal["auto"] = Field(
        default="auto", description="GPUs of one trial. auto: one where the cluster has GPUs, else none."
    )
    storage: str | None = Field(
        default=None,
        description="Where Tune keeps checkpoints: a path or a URI (file:///abs, s3://bucket/prefix, gs://...) "
        "that every node reaches. Null: <output_dir>/tune.",
    )

    @field_validator("search_space", mode="before")
    @classmethod
    def _lists_are_grids(cls, space):
        if isinstance(space, dict):
            return {k: {"grid": v} if isinstance(v, list) else v for k, v in space.items()}
        return space

    def grid(self, key: str) -> list[float] | None:
        """The values of a key searched as a grid, or None."""
        sampler = self.search_space.get(key)
        return sampler.grid if sampler is not None else None


class DeepSpeedSection(Strict):
    """ZeRO training of input prompts on a base too large for one GPU (`strategy: deepspeed`)."""

    num_workers: int = Field(
        default=2, ge=1, description="Ray Train workers of one trial, each holding a ZeRO shard."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=3, description="The ZeRO stage.")
    config: dict = Field(
        default={},
        description="Extra DeepSpeed config keys, checked by DeepSpeed itself before any worker starts.",
    )


class MlflowSection(Strict):
    """Where runs, metrics, experts and the model registry are recorded."""

    tracking_uri: str | None = Field(
        default=None,
        description="The MLflow tracking server or store. Null: sqlite:///<output_dir>/mlflow.db.",
    )
    artifact_root: str | None = Field(
        default=None, description="Where new experiments keep artifacts. Null: <output_dir>/mlartifacts."
    )
    experiment: str | None = Field(
        default=None, description="The MLflow experiment. Null: the config's name."
    )
    registry_prefix: str = Field(
        default="shores", description="Registered models are named <prefix>-<culture slug>."
    )
    retries: int = Field(default=3, ge=1, description="Attempts of each call to MLflow before it fails.")


class EvalSection(Strict):
    """`shores eval`: scoring and confidence intervals."""

    batch_size: int = Field(
        default=EVAL_BATCH_SIZE, ge=1, description="Questions in one scoring forward pass."
    )
    bootstrap: int = Field(default=1000, ge=10, description="Bootstrap resamples of each 95% interval.")


class ExperimentConfig(Strict):
    """Everything one experiment needs; unknown keys are errors."""

    name: str = Field(
        default="shores", description="The experiment's name: its MLflow experiment by default."
    )
    output_dir: str = Field(
        default="runs/shores", description="Where the experiment keeps its experts, checkpoints and records."
    )
    base_model: BaseModelSection = BaseModelSection()
    data: DataSection
    prompt: PromptSection = PromptSection()
    shared: SharedSection = SharedSection()
    # The trainer's own settings (workers/settings.py), validated as a section.
    train: TrainConfig = Field(default=TrainConfig(), description="How each packed trial trains its experts.")
    eval: EvalSection = EvalSection()
    tune: TuneSection = TuneSection()
    strategy: Literal["packed", "deepspeed"] = Field(
        default="packed",
        description="packed: a trial trains its experts together on one base; "
        "deepspeed: ZeRO-sharded over several workers, for a base too large for one GPU.",
    )
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    mlflow: MlflowSection = MlflowSection()
    serve: ServeSection = ServeSection()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        named = [c for c in (self.data.cultures or []) + self.data.held_out if is_shared(c)]
        if named:
            raise ValueError(f"{SHARED!r} is the shared prior's reserved name, not a culture (data)")
        if self.prompt.init == SHARED and not self.shared.enabled:
            raise ValueError("prompt.init: shared needs the shared prior (shared.enabled: true)")
        try:
            self.shared.train.over(self.train)
        except ValidationError as err:
            message = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"shared.train, over train: {message}") from None
        if self.prompt.kind == "deep" and self.strategy == "deepspeed":
            raise ValueError("prompt.kind deep trains with strategy packed (ZeRO trains input prompts only)")
        for key, sampler in self.tune.search_space.items():
            for value in sampler.bounds:
                try:
                    searched_config(self, {key: value})
                except ValidationError as err:
                    raise ValueError(
                        f"tune.search_space.{key}: {value!r}: {err.errors()[0]['msg']}"
                    ) from None
        return self

    @property
    def experts_dir(self) -> Path:
        return Path(self.output_dir) / "experts"


def searched_config(config: ExperimentConfig, values: dict) -> ExperimentConfig:
    """The config with searched values (`lr`, `num_virtual_tokens`, ...) in their sections, validated as the
    config is: a value the config would refuse raises a ValidationError here too."""
    train = {k: v for k, v in values.items() if k in TrainConfig.model_fields}
    prompt = {k: v for k, v in values.items() if k in PromptSection.model_fields}
    return config.model_copy(
        update={
            "train": TrainConfig.model_validate(config.train.model_dump() | train),
            "prompt": PromptSection.model_validate(config.prompt.model_dump() | prompt),
        }
    )


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)  # so numbers, lists and null parse as YAML would


def _read_tree(path: Path, extended_by: tuple[Path, ...] = ()) -> dict:
    """A config file's keys over those of the file it `extends` (relative to it), and so on down the chain."""
    by = f" (extended by {extended_by[-1]})" if extended_by else ""
    if path.resolve() in {p.resolve() for p in extended_by}:
        raise ConfigError(f"{path}: extends itself, through {' -> '.join(map(str, (*extended_by, path)))}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{by}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a file name, got {base!r}")
    return _merged(_read_tree(path.parent / base, (*extended_by, path)), tree)


def _merged(base: dict, over: dict) -> dict:
    """`over`'s keys over `base`'s, section by section; any other value (a list too) replaces the base's."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = _merged(base[key], value)
        merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML config (over the files it extends), applying `key.sub=value` overrides first."""
    path = Path(path)
    tree = _read_tree(path)
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
