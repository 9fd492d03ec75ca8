"""MLflow: a parent run per experiment, a run per trial, and one registered model per culture.

Only the driver talks to MLflow (the store can be a sqlite file on the head node); trials write
checkpoints, and everything logged here can be logged again later from those checkpoints. Every call is
retried; a store that stays down costs the log, never the experts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.config import ExperimentConfig
from workers.cultures import slug

T = TypeVar("T")
CHAMPION = "champion"


class TrackingError(RuntimeError):
    """MLflow could not be reached after every retry."""


@dataclass
class Store:
    """Where an experiment's MLflow data lives."""

    tracking_uri: str
    artifact_root: str
    experiment: str
    registry_prefix: str
    retries: int = 3

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Store:
        out = Path(config.output_dir).resolve()
        return cls(
            tracking_uri=config.mlflow.tracking_uri or f"sqlite:///{out / 'mlflow.db'}",
            artifact_root=config.mlflow.artifact_root or (out / "mlartifacts").as_uri(),
            experiment=config.mlflow.experiment or config.name,
            registry_prefix=config.mlflow.registry_prefix,
            retries=config.mlflow.retries,
        )

    def client(self) -> MlflowClient:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # MLflow's own HTTP retries back off for minutes; ours are shorter and say what failed.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one MLflow call, retrying with backoff; raise TrackingError naming `what` if it never works."""
        delay = 0.5
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except (MlflowException, OSError, ConnectionError) as err:
                if attempt == self.retries:
                    raise TrackingError(f"MLflow at {self.tracking_uri} failed to {what}: {err}") from err
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def experiment_id(self) -> str:
        client = self.client()

        def get_or_create() -> str:
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            # A server manages its own artifact root; a direct sqlite store needs one named.
            http = self.tracking_uri.startswith("http")
            return client.create_experiment(self.experiment, None if http else self.artifact_root)

        return self.call("open the experiment", get_or_create)

    def model_name(self, culture: str) -> str:
        return f"{self.registry_prefix}-{slug(culture)}"


def start_run(store: Store, name: str, parent_id: str | None = None, tags: dict | None = None) -> str:
    """Create a run (a child of `parent_id` if given) and return its id."""
    client = store.client()
    tags = dict(tags or {}) | {"mlflow.runName": name}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    experiment_id = store.experiment_id()
    return store.call(f"start run {name}", lambda: client.create_run(experiment_id, tags=tags).info.run_id)


def find_run(store: Store, tag: str, value: str) -> str | None:
    """The id of the run carrying tag=value in this experiment, if any."""
    client, experiment_id = store.client(), store.experiment_id()
    runs = store.call("search runs", lambda: client.search_runs([experiment_id], f"tags.`{tag}` = '{value}'"))
    return runs[0].info.run_id if runs else None


def log_params(store: Store, run_id: str, params: dict) -> None:
    client = store.client()
    flat = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in params.items()}
    store.call("log params", lambda: client.log_batch(run_id, params=_params(flat)))


def log_metrics(store: Store, run_id: str, metrics: dict[str, float], step: int) -> None:
    client = store.client()
    now = int(time.time() * 1000)
    batch = [
        mlflow.entities.Metric(k.replace("/", "."), float(v), now, step)
        for k, v in metrics.items()
        if _num(v)
    ]
    store.call("log metrics", lambda: client.log_batch(run_id, metrics=batch))


def log_artifacts(store: Store, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
    client = store.client()
    store.call("log artifacts", lambda: client.log_artifacts(run_id, str(local_dir), artifact_path))


def end_run(store: Store, run_id: str, status: str = "FINISHED") -> None:
    client = store.client()
    store.call("end run", lambda: client.set_terminated(run_id, status))


def register_expert(
    store: Store, culture: str, iso: str, run_id: str, artifact_path: str, tags: dict
) -> dict:
    """Add an expert as a new version of its culture's model; move `champion` to it only if it is better."""
    client = store.client()
    name = store.model_name(culture)

    def ensure_model() -> None:
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, tags={"culture": culture, "iso": iso})

    store.call(f"create registered model {name}", ensure_model)
    source = f"{store.call('get run', lambda: client.get_run(run_id)).info.artifact_uri}/{artifact_path}"
    tags = {k: str(v) for k, v in tags.items()}
    version = store.call(
        f"register {name}", lambda: client.create_model_version(name, source, run_id=run_id, tags=tags)
    ).version
    new = float(tags["val_alignment"])
    current = champion(store, culture)
    promoted = current is None or new > float(current.tags.get("val_alignment", "-inf"))
    if promoted:
        store.call("set alias", lambda: client.set_registered_model_alias(name, CHAMPION, version))
    return {
        "culture": culture,
        "model": name,
        "version": int(version),
        "champion": promoted,
        "val_alignment": new,
    }


def champion(store: Store, culture: str):
    """The culture's current champion model version, or None."""
    client = store.client()

    def get():
        try:
            return client.get_model_version_by_alias(store.model_name(culture), CHAMPION)
        except MlflowException:
            return None

    return store.call("read champion", get)


def _params(flat: dict) -> list:
    return [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]


def _num(value) -> bool:
    return isinstance(value, int | float) and value == value  # not NaN
