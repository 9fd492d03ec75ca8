"""The server's settings: the `serve` section of an experiment config, owned by the package that reads it.

Pydantic only, no Ray: the orchestrator's config embeds this section without loading the server.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from workers.defaults import CHAMPION, ROUTER_MODEL


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSection(Strict):
    """Ray Serve's autoscaling of the expert pool's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="The fewest replicas.")
    max_replicas: int = Field(default=2, ge=1, description="The most replicas.")
    target_ongoing_requests: float = Field(
        default=16,
        gt=0,
        description="Ongoing requests per replica Serve scales towards: about one full batch.",
    )


class DeploymentSection(Strict):
    """Where the server listens, its replicas and their resources, where the experts come from, and the
    queues in front of the pool."""

    host: str = Field(default="127.0.0.1", description="Loopback unless deliberately opened up.")
    port: int = Field(default=8000, ge=1, le=65535, description="The HTTP port.")
    num_replicas: int = Field(
        default=1, ge=1, description="ExpertPool replicas when `autoscaling` is not set."
    )
    autoscaling: AutoscalingSection | None = Field(
        default=None, description="Serve's autoscaling of the ExpertPool replicas; null: `num_replicas`."
    )
    cpus_per_replica: float = Field(default=1.0, gt=0, description="CPUs of one ExpertPool replica.")
    gpus_per_replica: float | Literal["auto"] = Field(
        default="auto", description="auto: one GPU per replica where the cluster has GPUs."
    )
    batching: Literal["mixed", "per_expert"] = Field(
        default="mixed", description="per_expert: one forward per expert (benchmarks)."
    )
    experts_source: Literal["directory", "registry"] = Field(
        default="directory", description="registry: each culture's `registry_alias` version from MLflow."
    )
    experts_dir: str | None = Field(
        default=None, description="The directory source; default <output_dir>/experts."
    )
    registry_alias: str = Field(default=CHAMPION, description="The alias the registry source serves.")
    reload_interval_s: float = Field(
        default=30.0, ge=0, description="How often replicas look for new experts; 0: never."
    )
    docs: bool = Field(default=False, description="Serve /docs and /openapi.json.")
    max_ongoing_requests: int | None = Field(
        default=None, ge=1, description="A pool replica's requests at once; null: 4 batches, at least 64."
    )
    max_queued_requests: int = Field(
        default=1024, ge=1, description="Requests waiting for a replica; over it: 503 with Retry-After."
    )
    retry_after_s: int = Field(default=1, ge=0, description="The Retry-After of a 503.")
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="The router's deadline on the pool: 504 after it."
    )


class LimitsSection(Strict):
    """What one request may ask for, and what one replica's engine holds."""

    max_batch_size: int = Field(
        default=16, ge=1, description="Rows (committee members) in a pool's running batch."
    )
    max_cache_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description=(
            "A replica's KV cache budget in slots (rows x padded width, soft-prompt slots included): a "
            "request joins the running batch while every row, grown to its longest, fits; one that never "
            "could is refused (422). auto: 32768 on a CPU; on a GPU, what `cache_memory_fraction` of its "
            "free memory holds once the model loads."
        ),
    )
    cache_memory_fraction: float = Field(
        default=0.5, gt=0, le=0.95, description="For `max_cache_tokens: auto` on a GPU."
    )
    max_tokens_per_step: int = Field(
        default=2048, ge=1, description="Prompt tokens (rows x length) one engine step prefills."
    )
    max_body_bytes: int = Field(default=65536, ge=1024, description="The cap on a request body's size.")
    max_new_tokens: int = Field(default=256, ge=1, description="The cap on a request's max_new_tokens.")
    default_max_new_tokens: int = Field(
        default=64, ge=1, description="A request's max_new_tokens when it gives none."
    )
    max_options: int = Field(default=26, ge=2, le=26, description="Option letters A-Z.")
    max_committee_size: int = Field(default=8, ge=1, description="The cap on a request's committee_size.")
    max_choices: int = Field(default=4, ge=1, description="The cap on an OpenAI request's `n`.")
    edge_refusals_per_s: float = Field(
        default=50,
        ge=0,
        description=(
            "Refusals the edge in Serve's proxy answers one client address a second, after a burst of as "
            "many; past that it holds each refusal until its turn (at most 5 s), so a client that floods "
            "bad requests runs at this rate. 0: no limit."
        ),
    )


class RoutingSection(Strict):
    """How a request's culture or text becomes a committee of experts."""

    committee_size: int = Field(
        default=3, ge=1, description="k of similarity and text committees, unless a request asks."
    )
    routing_temperature: float = Field(
        default=0.05, gt=0, description="The softmax temperature of committee weights."
    )
    router_model: str = Field(
        default=ROUTER_MODEL,
        description=(
            "The sentence embedder that routes text to cultures: an embedded package, a folder or a hub id."
        ),
    )


class AuthSection(Strict):
    """Who may call the server: the API key, the Host names, the web origins."""

    api_key_env: str | None = Field(
        default=None, description="The env var holding the bearer token; null: no auth."
    )
    allow_unauthenticated: bool = Field(
        default=False, description="Serve a non-loopback host without an API key."
    )
    allowed_hosts: list[str] | None = Field(
        default=None,
        description=(
            'The Host header names requests may carry (no port); null: loopback names and `host`; ["*"]: any.'
        ),
    )
    cors_origins: list[str] = Field(
        default=[], description="Origins whose web pages may call the API (CORS); empty: none."
    )


REMOVED_SERVE_KEYS = {"batch_wait_timeout_s": "the pool batches continuously"}


class ServeSection(Strict):
    """The server: its deployment, its limits, how it routes, and who may call it."""

    deployment: DeploymentSection = DeploymentSection()
    limits: LimitsSection = LimitsSection()
    routing: RoutingSection = RoutingSection()
    auth: AuthSection = AuthSection()

    @model_validator(mode="before")
    @classmethod
    def _no_flat_keys(cls, data: object) -> object:
        """Refuse a key of the old flat section, naming its group (or saying it was removed)."""
        for key in data if isinstance(data, dict) else ():
            if key in REMOVED_SERVE_KEYS:
                raise PydanticCustomError("removed", f"serve.{key} was removed: {REMOVED_SERVE_KEYS[key]}")
            if key in SERVE_GROUPS:
                raise PydanticCustomError("moved", f"serve.{key} moved to serve.{SERVE_GROUPS[key]}.{key}")
        return data

    @model_validator(mode="after")
    def _default_under_cap(self) -> ServeSection:
        if self.limits.default_max_new_tokens > self.limits.max_new_tokens:
            raise ValueError("serve.limits.default_max_new_tokens is over serve.limits.max_new_tokens")
        if self.routing.committee_size > self.limits.max_committee_size:
            raise ValueError("serve.routing.committee_size is over serve.limits.max_committee_size")
        return self


# The old flat keys of `serve`, each with the group it moved to (max_new_tokens: limits).
SERVE_GROUPS = {
    key: group for group, field in ServeSection.model_fields.items() for key in field.annotation.model_fields
}
