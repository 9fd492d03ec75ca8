"""The experiment config: one YAML file, validated before anything heavy starts, with key=value overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.cultures import SHARED, is_shared
from workers.defaults import CHAMPION, EVAL_BATCH_SIZE, MAX_LENGTH, ROUTER_MODEL, SPLIT_FRACTIONS
from workers.settings import TrainConfig


class ConfigError(ValueError):
    """A config that cannot be used, said in one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelSection(Strict):
    name: str = "smollm2-135m"  # hub id, local folder, or an embedded name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"


MIN_QUESTIONS = 30  # a culture's questions for an expert of its own, when the cultures are not named


class DataSection(Strict):
    path: str = "../shared/data/goqa/opinions.jsonl"  # relative to the working directory
    # Which cultures get experts: those named, the `top` N, or (neither given) every culture with at least
    # `min_questions` questions; the rest are answered by committees of similar cultures.
    cultures: list[str] | None = None
    top: int | None = Field(default=None, ge=1)
    # null: 30 when choosing the cultures (52 of the GlobalOpinionQA file's 130 countries), none for named ones
    min_questions: int | None = Field(default=None, ge=0)

    @property
    def question_floor(self) -> int:
        """The questions a trained culture needs: `min_questions`, else 30 unless the cultures are named."""
        if self.min_questions is not None:
            return self.min_questions
        return 0 if self.cultures is not None else MIN_QUESTIONS

    held_out: list[str] = []
    split: tuple[float, float, float] = SPLIT_FRACTIONS
    # Mixed into each question's hash: another salt is another split of the same questions.
    split_salt: str = ""
    max_length: int = Field(default=MAX_LENGTH, ge=8)

    @model_validator(mode="after")
    def _one_selection(self) -> DataSection:
        if self.cultures is not None and self.top is not None:
            raise ValueError("give at most one of data.cultures or data.top")
        return self


class SharedSection(Strict):
    """The shared survey prior: one culture-blind expert named `shared`, trained on every country's answers."""

    enabled: bool = False
    # Training questions of the prior (each one's answers pooled over its countries); null: all of them.
    max_questions: int | None = Field(default=None, ge=1)
    # The prior's trial trains alone when it comes first (prompt.init: shared): it may take every CPU.
    cpus_per_trial: float | None = Field(default=None, gt=0)  # null: tune.cpus_per_trial
    # The prior's own training settings over `train`'s (it has ~15x a culture's rows: bigger batches pay).
    train: dict[str, float | int | None] = {}

    @field_validator("train")
    @classmethod
    def _train_keys(cls, values: dict) -> dict:
        TrainConfig.model_validate(values)  # unknown keys and bad values fail here, naming the key
        return values


class PromptSection(Strict):
    # input: L soft tokens before the text (prompt tuning); deep: L virtual keys and values at every layer
    # (prefix tuning). num_virtual_tokens is L of the kind chosen.
    kind: Literal["input", "deep"] = "input"
    num_virtual_tokens: int = Field(default=8, ge=1, le=512)
    # shared: every culture's expert starts from the shared prior, trained first (needs shared.enabled)
    init: Literal["persona", "random", "shared"] = "persona"


SearchKey = Literal["lr", "num_virtual_tokens", "weight_decay", "batch_size"]
INT_SEARCH_KEYS = ("num_virtual_tokens", "batch_size")


class Sampler(Strict):
    """One hyperparameter's search, in Tune's forms: exactly one of grid, choice, uniform, loguniform."""

    grid: list[float] | None = None  # every value, crossed with the other grids
    choice: list[float] | None = None  # one value drawn per sample
    uniform: tuple[float, float] | None = None  # low, high
    loguniform: tuple[float, float] | None = None  # low, high; both above 0

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
    experts_per_trial: int = Field(default=1, ge=1)  # cultures trained packed in one trial
    num_samples: int = Field(default=1, ge=1)  # draws of the search space per culture group, seeds seed+i
    # A list is a grid; {grid|choice|uniform|loguniform: ...} the Tune sampling form of that name.
    search_space: dict[SearchKey, Sampler] = {}
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1)  # epochs before ASHA may stop a trial
    max_failures: int = Field(default=2, ge=0)  # retries of a trial whose worker died, from its checkpoint
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float | Literal["auto"] = "auto"  # auto: one GPU where the cluster has GPUs, else none
    # Where Tune keeps checkpoints: a path or a URI (file:///abs, s3://bucket/prefix, gs://...) that every
    # node reaches; default <output_dir>/tune.
    storage: str | None = None

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
    num_workers: int = Field(default=2, ge=1)  # Ray Train workers of one trial, each holding a ZeRO shard
    zero_stage: Literal[0, 1, 2, 3] = 3
    config: dict = {}  # extra DeepSpeed config keys, checked by DeepSpeed itself before any worker starts


class MlflowSection(Strict):
    tracking_uri: str | None = None  # default: sqlite:///<output_dir>/mlflow.db
    artifact_root: str | None = None  # default: <output_dir>/mlartifacts
    experiment: str | None = None  # default: the config's name
    registry_prefix: str = "shores"  # registered models are <prefix>-<culture slug>
    retries: int = Field(default=3, ge=1)


class EvalSection(Strict):
    batch_size: int = Field(default=EVAL_BATCH_SIZE, ge=1)
    bootstrap: int = Field(default=1000, ge=10)


class AutoscalingSection(Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)  # per replica: about one full batch


class ServeSection(Strict):
    host: str = "127.0.0.1"  # loopback unless deliberately opened up
    port: int = Field(default=8000, ge=1, le=65535)
    experts_source: Literal["directory", "registry"] = (
        "directory"  # registry: each culture's `registry_alias`
    )
    experts_dir: str | None = None  # the directory source; default <output_dir>/experts
    registry_alias: str = CHAMPION
    num_replicas: int = Field(default=1, ge=1)  # ExpertPool replicas when autoscaling is not set
    autoscaling: AutoscalingSection | None = None
    cpus_per_replica: float = Field(default=1.0, gt=0)
    gpus_per_replica: float | Literal["auto"] = "auto"  # auto: one GPU a replica where the cluster has GPUs
    max_batch_size: int = Field(default=16, ge=1)  # rows (committee members) in a pool's running batch
    # A replica's KV cache budget in slots (rows x padded width, soft-prompt slots included): a request joins
    # the running batch while every row, grown to its longest, fits; one that never could is refused (422).
    # auto: 32768 on a CPU; on a GPU, what cache_memory_fraction of its free memory holds once the model loads.
    max_cache_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    cache_memory_fraction: float = Field(default=0.5, gt=0, le=0.95)  # for max_cache_tokens: auto on a GPU
    max_tokens_per_step: int = Field(
        default=2048, ge=1
    )  # prompt tokens (rows x length) one engine step prefills
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)  # unused: the pool batches continuously
    batching: Literal["mixed", "per_expert"] = "mixed"  # per_expert: one forward per expert (benchmarks)
    max_body_bytes: int = Field(default=65536, ge=1024)
    max_new_tokens: int = Field(default=256, ge=1)  # the cap on a request's max_new_tokens
    default_max_new_tokens: int = Field(default=64, ge=1)
    max_options: int = Field(default=26, ge=2, le=26)  # option letters A-Z
    committee_size: int = Field(default=3, ge=1)  # k of similarity and text committees, unless asked
    routing_temperature: float = Field(default=0.05, gt=0)  # softmax temperature of committee weights
    router_model: str = ROUTER_MODEL
    reload_interval_s: float = Field(default=30.0, ge=0)  # how often replicas look for new experts; 0: never
    api_key_env: str | None = None  # the env var holding the bearer token; None: no auth
    allow_unauthenticated: bool = False  # serve a non-loopback host without an API key
    docs: bool = False  # /docs and /openapi.json
    # The Host header names requests may carry (no port); None: loopback names and `host`; ["*"]: any.
    allowed_hosts: list[str] | None = None
    cors_origins: list[str] = []  # origins whose web pages may call the API (CORS); empty: none
    max_committee_size: int = Field(default=8, ge=1)  # the cap on a request's committee_size
    max_choices: int = Field(default=4, ge=1)  # the cap on an OpenAI request's `n`
    max_ongoing_requests: int | None = Field(default=None, ge=1)  # a pool replica's; None: 4 batches, >= 64
    max_queued_requests: int = Field(default=1024, ge=1)  # waiting for a replica; over it: 503 + Retry-After
    retry_after_s: int = Field(default=1, ge=0)  # the Retry-After of a 503
    request_timeout_s: float = Field(default=120.0, gt=0)  # the router's deadline on the pool: 504 after it

    @model_validator(mode="after")
    def _default_under_cap(self) -> ServeSection:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("serve.default_max_new_tokens is over serve.max_new_tokens")
        if self.committee_size > self.max_committee_size:
            raise ValueError("serve.committee_size is over serve.max_committee_size")
        return self


class ExperimentConfig(Strict):
    """Everything one experiment needs; unknown keys are errors."""

    name: str = "shores"
    output_dir: str = "runs/shores"
    base_model: BaseModelSection = BaseModelSection()
    data: DataSection
    prompt: PromptSection = PromptSection()
    shared: SharedSection = SharedSection()
    train: TrainConfig = TrainConfig()  # the trainer's own settings, validated as a section
    eval: EvalSection = EvalSection()
    tune: TuneSection = TuneSection()
    strategy: Literal["packed", "deepspeed"] = "packed"  # deepspeed: a base too large for one GPU
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
