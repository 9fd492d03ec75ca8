"""The model registry's lifecycle: where an experiment's MLflow data lives, and each culture's champion.

`Store` names the MLflow store (tracking URI, artifact root, experiment); `Champions` registers a winner as
a version of its culture's model, promotes it through the champion gate (`orchestrator.gate`) with a
compare-and-set on the `champion` alias, promotes by hand (`shores experts promote`, `--force` to roll
back) and retires. Run logging, which a registered version points at, is `orchestrator.tracking`.
Credentials in the tracking URI never reach a message, a log, a file or a param (`public_config`,
`restore_credentials`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.gate import Rescorer, Verdict, champion_gate, stored_score
from orchestrator.results import Winner
from orchestrator.survey import DataFingerprint
from workers.base_model import FrozenBase, load_frozen_base
from workers.cultures import slug
from workers.expert_file import load_expert
from workers.expert_store import CHAMPION, REDACTED, ExpertsNotFoundError, Registry, RegistryError, redact

EXPERIMENT_TAG = "shores.experiment"  # on the parent run, and on every version registered from its trials
TRIAL_TAG = "shores.trial_id"  # on a trial's run, and on every version registered from it
# MLflow 3's UI opens an experiment on its GenAI traces unless this tag says it trains models (the values
# are the UI's ExperimentKind enum: "custom_model_development" is its "Machine learning").
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
PROMOTION_ATTEMPTS = 5


class TrackingError(RegistryError):
    """MLflow could not be reached after every retry (while recording an experiment)."""


def public_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config as it may be written, logged and handed to trials: no credentials in the tracking URI."""
    uri = config.mlflow.tracking_uri
    if not uri or redact(uri) == uri:
        return config
    mlflow_section = config.mlflow.model_copy(update={"tracking_uri": redact(uri)})
    return config.model_copy(update={"mlflow": mlflow_section})


def restore_credentials(
    saved: ExperimentConfig, original: ExperimentConfig | None = None
) -> ExperimentConfig:
    """A config read back from <output_dir>/config.yaml, its tracking URI's credentials taken from
    `original` (the config the experiment was started with) or the MLFLOW_TRACKING_URI variable."""
    uri = saved.mlflow.tracking_uri
    if not uri or REDACTED not in uri:
        return saved
    candidates = [("--config", original.mlflow.tracking_uri if original else None)]
    candidates.append(("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")))
    for _, candidate in candidates:
        if candidate and redact(candidate) == uri:
            return saved.model_copy(
                update={"mlflow": saved.mlflow.model_copy(update={"tracking_uri": candidate})}
            )
    raise ConfigError(
        f"the saved config's MLflow store {uri} had credentials, which are never saved: pass the original "
        "config with --config, or set MLFLOW_TRACKING_URI to the full URI"
    )


@dataclass(frozen=True, kw_only=True)
class Store(Registry):
    """Where an experiment's MLflow data lives: its registry, artifact root and experiment."""

    artifact_root: str
    experiment: str
    error = TrackingError

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Store:
        out = Path(config.output_dir).resolve()
        return cls(
            tracking_uri=Registry.of_experiment(out, config.mlflow).tracking_uri,
            artifact_root=config.mlflow.artifact_root or (out / "mlartifacts").as_uri(),
            experiment=config.mlflow.experiment or config.name,
            registry_prefix=config.mlflow.registry_prefix,
            retries=config.mlflow.retries,
        )

    def experiment_id(self) -> str:
        client = self.client()

        def get_or_create() -> str:
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                if found.tags.get(KIND_TAG) != KIND:  # made by an older shores, or by hand
                    client.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
                return found.experiment_id
            # A server manages its own artifact root; a direct sqlite store needs one named.
            http = self.tracking_uri.startswith("http")
            root = None if http else self.artifact_root
            return client.create_experiment(self.experiment, root, tags={KIND_TAG: KIND})

        return self.call("open the experiment", get_or_create)


@dataclass
class Registration:
    """A winner as a registered model version, and whether it is the culture's champion now."""

    culture: str
    model: str
    version: int
    champion: bool
    val_alignment: float
    note: str = ""  # why it is not the champion, when that is not simply a lower score


class Champions:
    """A store's registered experts: each culture's model versions, and which one is its champion."""

    def __init__(
        self,
        store: Store,
        rescorer: Rescorer,
        experiment: str,
        hook: Callable[[str, str], None] | None = None,
    ):
        self.store = store
        self.rescorer = rescorer
        self.experiment = experiment  # tags each version it registers: registering again adds none
        # Called with (point, model name) at the steps of a champion promotion, so that tests can
        # make a competing promotion happen exactly there.
        self.hook = hook or (lambda point, model: None)

    @classmethod
    def from_config(
        cls,
        config: ExperimentConfig,
        store: Store | None = None,
        hook: Callable[[str, str], None] | None = None,
        base: Callable[[], FrozenBase] | None = None,
    ) -> Champions:
        """The experiment's registry. The champion gate re-scores experts validated on other data with the
        base (`base`: a loader of the one the driver holds; by default the config's, loaded the first time it
        is needed)."""
        store = store or Store.from_config(config)
        section = config.base_model
        rescorer = Rescorer(
            store,
            base or (lambda: load_frozen_base(section.name, section.dtype, section.device)),
            config.data.max_length,
            config.eval.batch_size,
        )
        return cls(store, rescorer, config.name, hook)

    def register(self, winner: Winner, trial_run: Callable[[str], str]) -> Registration:
        """Make a winner a version of its culture's model (unless it is one already); promote it if better.

        `trial_run`: the id of a trial's MLflow run (the tracker's), whose artifacts the version points at.
        """
        client, name = self.store.client(), self.store.model_name(winner.culture)
        meta = load_expert(winner.expert_file).meta

        def ensure_model() -> None:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name, tags={"culture": meta.culture, "iso": meta.iso})

        self.store.call(f"create registered model {name}", ensure_model)
        run_id = trial_run(winner.trial_id)
        source = f"{self.store.call('get run', lambda: client.get_run(run_id)).info.artifact_uri}/experts/"
        source += slug(winner.culture)
        tags = {
            "culture": meta.culture,
            "iso": meta.iso,
            "base_model": meta.base_model,
            "base_fingerprint": meta.base_fingerprint,
            "num_virtual_tokens": meta.num_virtual_tokens,
            "hidden_size": meta.hidden_size,
            "prefix_tokens": meta.prefix_tokens,
            "val_alignment": winner.val_alignment,
            EXPERIMENT_TAG: self.experiment,
            TRIAL_TAG: winner.trial_id,
        }
        fingerprint = DataFingerprint.from_dict(meta.training.get("data"))
        tags = {k: str(v) for k, v in tags.items()} | (fingerprint.tags() if fingerprint else {})

        def find_or_create() -> ModelVersion:
            # Idempotent per experiment, trial and culture: `register --from` twice adds nothing.
            for version in client.search_model_versions(f"name = '{name}'"):
                if all(version.tags.get(k) == tags[k] for k in (EXPERIMENT_TAG, TRIAL_TAG, "culture")):
                    return version
            return client.create_model_version(name, source, run_id=run_id, tags=tags)

        version = self.store.call(f"register {name}", find_or_create)
        champion, note = self._promote(name, version)
        return Registration(winner.culture, name, int(version.version), champion, winner.val_alignment, note)

    def promote(self, culture: str, version: int, force: bool = False, user: str = "") -> Registration:
        """Make a registered version its culture's champion: through the champion gate of training (it
        must beat the champion), or with `force` whatever it scores (a roll back). Tags who and when."""
        client, name, chosen = (
            self.store.client(),
            self.store.model_name(culture),
            self._version(culture, version),
        )
        if force:
            self.store.call(
                "set alias", lambda: client.set_registered_model_alias(name, CHAMPION, str(version))
            )
            champion, note = True, ""
        else:
            champion, note = self._promote(name, chosen)
        if champion:
            self._log_change(name, "promoted", user, version)
        culture = chosen.tags.get("culture", culture)
        return Registration(culture, name, version, champion, stored_score(chosen), note)

    def retire(self, culture: str, user: str = "") -> int:
        """Take a culture's champion alias away (its versions stay registered); tag who and when. Returns the
        version that was champion; ExpertsNotFoundError if the culture has none."""
        client, name = self.store.client(), self.store.model_name(culture)
        self._version(culture, None)  # the culture is registered
        current = self._champion(name)
        if current is None:
            raise ExpertsNotFoundError(f"{culture} has no champion to retire ({name})")
        self.store.call("delete alias", lambda: client.delete_registered_model_alias(name, CHAMPION))
        self._log_change(name, "retired", user, int(current.version))
        return int(current.version)

    def _version(self, culture: str, version: int | None) -> ModelVersion | None:
        """A registered version of a culture's model (None: only check that it exists); else one clear line."""
        client, name = self.store.client(), self.store.model_name(culture)

        def versions() -> list[ModelVersion]:
            try:
                return client.search_model_versions(f"name = '{name}'")
            except MlflowException:
                return []

        found = self.store.call(f"list versions of {name}", versions)
        if not found:
            raise ExpertsNotFoundError(f"no registered experts of {culture} ({name})")
        if version is None:
            return None
        for row in found:
            if int(row.version) == int(version):
                return row
        known = ", ".join(str(v) for v in sorted(int(r.version) for r in found))
        raise ExpertsNotFoundError(f"{name} has no version {version}; its versions: {known}")

    def _log_change(self, name: str, change: str, user: str, version: int) -> None:
        """Record on the registered model who changed its champion, how and when (MLflow keeps no history)."""
        client = self.store.client()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tags = {
            f"shores.{change}_by": user or "unknown",
            f"shores.{change}_at": when,
            f"shores.{change}": str(version),
        }
        for key, value in tags.items():
            self.store.call(f"tag {name}", lambda k=key, v=value: client.set_registered_model_tag(name, k, v))

    def _promote(self, name: str, challenger: ModelVersion) -> tuple[bool, str]:
        """Compare-and-set `champion`: move it to the challenger only if it beats the champion it read."""
        client = self.store.client()
        for _ in range(PROMOTION_ATTEMPTS):
            current = self._champion(name)
            if _version_of(current) == _version_of(challenger):
                return True, ""
            verdict = self.gate(challenger, current)
            if not verdict.promote:
                return False, verdict.note
            self.hook("champion-read", name)
            if _version_of(self._champion(name)) != _version_of(current):
                continue  # someone else promoted meanwhile: compare with theirs
            self.store.call(
                "set alias", lambda: client.set_registered_model_alias(name, CHAMPION, challenger.version)
            )
            self.hook("champion-set", name)
            if _version_of(self._champion(name)) == _version_of(challenger):
                return True, ""
            # Someone else moved it after our write: compare with theirs.
        raise TrackingError(f"the champion of {name} kept moving; run `shores register --from` again")

    def gate(self, challenger: ModelVersion, champion: ModelVersion | None) -> Verdict:
        """Whether `challenger` replaces `champion` (`orchestrator.gate`): the same base and prompt shape, and
        validation alignment on the same records, re-scoring both on the challenger's split where they differ."""
        return champion_gate(challenger, champion, self.rescorer)

    def use_base(self, base: Callable[[], FrozenBase]) -> None:
        """Re-score with this base (the one the driver holds) rather than loading the config's again."""
        self.rescorer.load_base = base

    def _champion(self, name: str) -> ModelVersion | None:
        client = self.store.client()

        def get() -> ModelVersion | None:
            version = client.get_registered_model(name).aliases.get(CHAMPION)
            return None if version is None else client.get_model_version(name, str(version))

        return self.store.call("read champion", get)


def _version_of(version: ModelVersion | None) -> str | None:
    return None if version is None else str(version.version)
