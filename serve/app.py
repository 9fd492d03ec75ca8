"""The Serve application: a Router ingress in front of ExpertPool replicas, composed with `.bind()`.

`app` is the Application for `serve run serve.app:app`, `serve build serve.app:app` and the Serve config
in serve/serve_config.yaml; it is built on first access from the config named by $SHORES_CONFIG
(default configs/demo.yaml). `shores serve --config C` runs the same graph through `run()`.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.config import BackpressureConfig

from orchestrator.config import ConfigError, ExperimentConfig, load_config
from serve.edge import EDGE_ENV, EDGE_IMPORT_PATH
from serve.exposure import open_host_refusal
from serve.pool import ExpertPool, PoolSettings
from serve.router import Router
from serve.routes import APP_NAME
from workers.expert_store import (
    SIMILARITY_FILE,
    DirectorySource,
    ExpertsNotFoundError,
    Registry,
    RegistryError,
    RegistrySource,
    load_experts,
    registered_experts,
)

CONFIG_ENV = "SHORES_CONFIG"
DEFAULT_CONFIG = "configs/demo.yaml"
REPO = Path(__file__).resolve().parents[1]
# Half a CPU per router replica: it embeds short texts and relays JSON; the pool replicas do the model work.
ROUTER_CPUS = 0.5
# Requests the router relays at once. It only waits on the pool, which does the work and bounds the queue (503).
# Requests Serve's proxy queues for a router slot are not served in order: with 256, some of a 600-request
# burst waited there over 45 s while the router answered each in under 4 s.
ROUTER_ONGOING = 1024
SERVE_LOGS = "/tmp/ray/session_latest/logs/serve"


def absolute_paths(config: ExperimentConfig, root: Path) -> ExperimentConfig:
    """The config with its relative paths made absolute, since replicas do not share the driver's cwd."""
    config = config.model_copy(deep=True)

    def fix(path: str) -> str:
        return str(path if Path(path).is_absolute() else (root / path).resolve())

    config.output_dir = fix(config.output_dir)
    config.data.path = fix(config.data.path)
    if config.serve.deployment.experts_dir:
        config.serve.deployment.experts_dir = fix(config.serve.deployment.experts_dir)
    if (root / config.base_model.name).exists():  # a local model folder, not a hub id or embedded name
        config.base_model.name = fix(config.base_model.name)
    return config


def gpus_per_replica(config: ExperimentConfig) -> float:
    """`auto`: one GPU per replica where the cluster (or, before Ray starts, this machine) has GPUs."""
    asked = config.serve.deployment.gpus_per_replica
    if asked != "auto":
        return float(asked)
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def experts_dir(config: ExperimentConfig) -> Path:
    """Where the directory source reads experts, and where training leaves survey similarity."""
    return Path(config.serve.deployment.experts_dir or config.experts_dir)


def expert_source(config: ExperimentConfig) -> DirectorySource | RegistrySource:
    """Where this config's experts come from."""
    if config.serve.deployment.experts_source == "registry":
        return RegistrySource(
            Registry.of_experiment(config.output_dir, config.mlflow),
            config.serve.deployment.registry_alias,
            downloads=Path(config.output_dir) / "registry" / "serve",
            similarity_path=experts_dir(config) / SIMILARITY_FILE,
        )
    return DirectorySource(experts_dir(config))


def pool_settings(config: ExperimentConfig) -> PoolSettings:
    """What an ExpertPool replica uses from the config."""
    deployment, limits = config.serve.deployment, config.serve.limits
    return PoolSettings(
        base_model=config.base_model.name,
        dtype=config.base_model.dtype,
        device=config.base_model.device,
        source=expert_source(config),
        max_rows=limits.max_batch_size,
        per_expert=deployment.batching == "per_expert",
        reload_interval_s=deployment.reload_interval_s,
        max_cache_tokens=None if limits.max_cache_tokens == "auto" else limits.max_cache_tokens,
        cache_memory_fraction=limits.cache_memory_fraction,
        max_tokens_per_step=limits.max_tokens_per_step,
    )


def build_app(config: ExperimentConfig, pool: Deployment = ExpertPool) -> Application:
    """The graph: Router -> ExpertPool, with replicas, batching and resources from `config.serve`.

    `pool` is the pool's deployment: ExpertPool, or a subclass (the serving tests' holds requests at a gate).
    """
    section = config.serve
    deployment = section.deployment
    scaling = {"num_replicas": deployment.num_replicas}
    if deployment.autoscaling is not None:
        scaling = {"autoscaling_config": deployment.autoscaling.model_dump()}
    # Over `max_queued_requests` waiting for a replica, a request is refused at once: 503 with Retry-After.
    backpressure = BackpressureConfig(status_code=503, retry_after_s=deployment.retry_after_s)
    pool = pool.options(
        **scaling,
        # Enough requests per replica for the engine's batch to fill, and more waiting to join it.
        max_ongoing_requests=deployment.max_ongoing_requests or max(64, 4 * section.limits.max_batch_size),
        max_queued_requests=deployment.max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": deployment.cpus_per_replica, "num_gpus": gpus_per_replica(config)},
    ).bind(pool_settings(config))
    return Router.options(
        max_ongoing_requests=ROUTER_ONGOING,
        # Serve counts a request as queued until it is assigned a replica, so a queue bound under the router's
        # free slots would refuse simultaneous arrivals that it has room for: the pool's queue is the real bound.
        max_queued_requests=max(deployment.max_queued_requests, ROUTER_ONGOING),
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": ROUTER_CPUS},
    ).bind(pool, section)


def config_from_env() -> ExperimentConfig:
    """The config named by $SHORES_CONFIG, relative to the cwd or else to the repository."""
    name = os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)
    root = Path.cwd() if (Path.cwd() / name).exists() or Path(name).is_absolute() else REPO
    return absolute_paths(load_config(root / name), root)


def __getattr__(name: str) -> Application:
    # Built on first access, so importing serve.app (tests, `shores serve`) reads no config.
    if name == "app":
        return build_app(config_from_env())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def preflight(config: ExperimentConfig) -> None:
    """Fail early, in one line, when there is nothing to serve or no key (before Ray and replicas start)."""
    section = config.serve
    key = section.auth.api_key_env
    if key and not os.environ.get(key):
        raise ConfigError(f"serve.auth.api_key_env names {key}, which is not set in this environment")
    # The router refuses the same (the rule holds for `serve run` and `serve deploy` too); here it fails early.
    host = section.deployment.host
    if open_host_refusal(host, section):
        raise ConfigError(
            f"serve.deployment.host {host} is reachable from other machines and serve.auth.api_key_env is "
            "not set: set an API key, or serve.auth.allow_unauthenticated: true"
        )
    if section.deployment.experts_source == "directory":
        load_experts(experts_dir(config))
        return
    source = expert_source(config)
    try:
        rows = registered_experts(source.registry)
    except RegistryError as err:
        if not source.has_last_good():
            raise
        print(f"warning: {err}; the replicas start from the last good copy of the experts", file=sys.stderr)
        return
    alias = section.deployment.registry_alias
    if not any(alias in r["aliases"] for r in rows):
        raise ExpertsNotFoundError(f"no experts registered under the alias {alias!r}; train some first")


class ServeStartError(RuntimeError):
    """The graph did not come up; the first replica error, in one line."""


def start(config: ExperimentConfig) -> None:
    """Start (or join) Ray and Serve on the config's host and port, and deploy the graph."""
    import ray

    if not ray.is_initialized():
        # The proxy answers the refusals it can judge itself (serve/edge.py); its processes inherit this.
        os.environ.setdefault(EDGE_ENV, EDGE_IMPORT_PATH)
        # Replica logs stay in Ray's log folder: the terminal keeps one line a state and the one-line errors.
        # The dashboard (and Prometheus metrics) listen on loopback only.
        context = ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
        )
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installs its own, which aborts
        if context.dashboard_url:
            print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    deployment = config.serve.deployment
    serve.start(http_options={"host": deployment.host, "port": deployment.port})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    except RuntimeError as err:
        raise ServeStartError(_why(err)) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _why(err: RuntimeError) -> str:
    # Serve's exception names only the failed deployment; the replica's own error ends its status message.
    app = serve.status().applications.get(APP_NAME)
    for name, deployment in (app.deployments if app else {}).items():
        lines = [line.strip() for line in deployment.message.splitlines() if line.strip()]
        if deployment.status.value.endswith("FAILED") and lines:
            found = re.match(r"(?:[\w.]*\.)?(\w+): (.*)", lines[-1])  # `module.SomeError: message`
            return f"{name} did not start: " + (f"{found[1]}: {found[2]}" if found else lines[-1])
    return str(err).strip().splitlines()[0]


def run(config: ExperimentConfig) -> int:
    """`shores serve`: deploy the graph and keep it up until interrupted, then shut down cleanly."""
    import ray

    config = absolute_paths(config, Path.cwd())
    preflight(config)
    # SIGTERM (a service manager, `kill`, a shell's background job) stops it the way Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start(config)
        deployment = config.serve.deployment
        print(f"serving on http://{deployment.host}:{deployment.port} (Ctrl-C to stop)", flush=True)
        print(f"replica logs: {SERVE_LOGS} on the head node", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
        return 0
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
