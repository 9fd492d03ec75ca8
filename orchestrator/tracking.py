"""MLflow: one tracker owns the experiment's records, from the parent run to the registry's champions.

Only the driver talks to MLflow (the store can be a sqlite file on the head node); trials write
checkpoints, and everything logged here can be logged again later from those checkpoints
(`shores register --from`), without duplicates. Every call is retried; a store that stays down costs the
log, never the experts. Credentials in the tracking URI never reach a message, a log, a file or a param.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from ray import tune

from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.evaluate import METHODS, format_table
from orchestrator.gate import Rescorer, Verdict, champion_gate, stored_score
from orchestrator.results import FinishedTrial, Winner, tracked_metrics
from orchestrator.survey import DataFingerprint
from workers.base_model import FrozenBase, load_frozen_base
from workers.cultures import slug
from workers.expert_file import load_expert
from workers.expert_store import CHAMPION, REDACTED, ExpertsNotFoundError, Registry, RegistryError, redact

T = TypeVar("T")
EXPERIMENT_TAG = "shores.experiment"
TRIAL_TAG = "shores.trial_id"
CULTURES_TAG = "shores.cultures"  # on a trial's run: the cultures it trained, comma-separated
SPLIT_TAG = "shores.eval_split"  # on an evaluation's run: the split it scored
# MLflow 3's UI opens an experiment on its GenAI traces unless this tag says it trains models (the values
# are the UI's ExperimentKind enum: "custom_model_development" is its "Machine learning").
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI decides its view by a global "GenAI | Model training" switch (default GenAI) and ignores
# the tag; a link that carries this query opens the model-training view (runs, metrics, model registry).
UI_VIEW = "workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"  # what the UI shows as a run's description (markdown)
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


def evaluation_run_name(report: dict) -> str:
    """`eval-<split>` on the experiment's own data; `eval-<file stem>-<split>` on another file (`--data`), so
    evaluations of several questionnaires tell apart in the MLflow UI."""
    other = report.get("data_file")
    return f"eval-{Path(other).stem}-{report['split']}" if other else f"eval-{report['split']}"


class ExperimentTracker:
    """The experiment's MLflow records: the driver says what happened, the tracker logs and registers it.

    Events, in order: `experiment_started`, `trial_reported` (live, through `live_metrics()`, a Tune
    callback), `trial_finished` for every trial, `winners_chosen`, `experiment_finished`; `record` sends
    the last three at once. Each may be sent again (after an outage): runs, metrics and model versions
    are found before they are created.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        store: Store | None = None,
        hook: Callable[[str, str], None] | None = None,
        base: Callable[[], FrozenBase] | None = None,
    ):
        self.config = public_config(config)  # what gets logged
        self.store = store or Store.from_config(config)
        # The champion gate re-scores experts validated on other data with the base (`base`: a loader of the
        # one the driver holds; by default the config's, loaded the first time it is needed).
        section = config.base_model
        self.rescorer = Rescorer(
            self.store,
            base or (lambda: load_frozen_base(section.name, section.dtype, section.device)),
            config.data.max_length,
            config.eval.batch_size,
        )
        self.name = config.name
        # Called with (point, model name) at the steps of a champion promotion, so that tests can
        # make a competing promotion happen exactly there.
        self.hook = hook or (lambda point, model: None)
        self.parent: str | None = None  # the parent run's id, once opened
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.trials: dict[str, tuple[list[str], str]] = {}  # trial id -> (cultures, status), once finished
        self.registered: list[Registration] = []
        self.live = True  # False once the store failed during training: the rest is logged at the end

    # --- events ---------------------------------------------------------------------------------

    def experiment_started(self) -> None:
        """Open the experiment's parent run; a store that is down now is only warned about."""
        try:
            self._parent_run()
        except TrackingError as err:
            self._live_failed(err)

    def live_metrics(self) -> tune.Callback:
        """A Tune callback that reports each trial's epochs to the tracker as they arrive."""
        return _LiveMetrics(self)

    def trial_reported(self, trial_id: str, result: dict) -> None:
        """Log one epoch of a running trial; an unreachable store only costs the live view."""
        if not self.live:
            return
        try:
            self._log_metrics(self._trial_run(trial_id), tracked_metrics(result), int(result["epoch"]))
        except TrackingError as err:
            self._live_failed(err)

    def trial_finished(self, trial: FinishedTrial) -> str:
        """Log a trial's settings, the epochs not logged yet, its experts, table and curve; end its run."""
        run_id = self._trial_run(trial.trial_id)
        client = self.store.client()
        self._log_params(run_id, trial.params)
        cultures = trial_cultures(trial)
        self.store.call(
            "tag run", lambda: client.set_tag(run_id, CULTURES_TAG, ", ".join(cultures) or "(none)")
        )
        logged = self.store.call("read metrics", lambda: client.get_metric_history(run_id, "val_gain"))
        done = {m.step for m in logged}
        for row in trial.history:
            if int(row["epoch"]) not in done:
                self._log_metrics(run_id, tracked_metrics(row), int(row["epoch"]))
        if trial.experts is not None:
            self._log_trial_artifacts(run_id, trial)
        status = "FAILED" if trial.failed else "FINISHED"
        self.store.call("end run", lambda: client.set_terminated(run_id, status))
        self.trials[trial.trial_id] = (cultures, status)
        return run_id

    def winners_chosen(self, winners: dict[str, Winner]) -> list[Registration]:
        """Register each culture's winner (once per trial and culture) and promote it if it is better."""
        self.registered = [self.register(winner) for _, winner in sorted(winners.items())]
        return self.registered

    def experiment_finished(self) -> None:
        """Describe the parent run (its trials and winners, linked) and end it."""
        parent, client = self._parent_run(), self.store.client()
        note = self._parent_note(self.store.experiment_id())
        self.store.call("describe run", lambda: client.set_tag(parent, NOTE_TAG, note))
        self.store.call("end run", lambda: client.set_terminated(parent, "FINISHED"))

    def evaluation_finished(
        self, report: dict, files: list[Path], champions: dict[str, tuple[str, int]] | None = None
    ) -> str:
        """Log an evaluation as a run named by `evaluation_run_name` (metrics with intervals, table, files, the
        data file and split as params); tag champions.

        `champions` maps each evaluated culture to its registered (model, version), when the experts came
        from the registry: each such version gets a `<split>_alignment` tag. Returns the run's id.
        """
        client, experiment_id, split = self.store.client(), self.store.experiment_id(), report["split"]
        table, name = format_table(report), evaluation_run_name(report)
        tags = {
            "mlflow.runName": name,
            SPLIT_TAG: split,
            NOTE_TAG: f"Alignment on the {split} split (1 - JS distance, 95% bootstrap intervals "
            f"in the metrics `*.ci95_low` / `*.ci95_high`):\n\n```\n{table}\n```",
        }
        # A new run each evaluation: the champions evaluated may differ from one to the next.
        run_id = self.store.call(
            f"open run {name}", lambda: client.create_run(experiment_id, tags=tags).info.run_id
        )
        params = {
            "split": split,
            "data": report.get("data", ""),
            "experts": sorted(report.get("experts", {})),
        }
        self._log_params(run_id, params)
        self._log_metrics(run_id, report_metrics(report), 0)
        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp)
            (staging / "alignment_table.txt").write_text(table + "\n")
            for path in files:
                shutil.copy2(path, staging / path.name)
            self.store.call("log artifacts", lambda: client.log_artifacts(run_id, str(staging)))
        for culture, (model, version) in sorted((champions or {}).items()):
            score = report["cultures"].get(culture, {}).get("expert")
            if score is not None:
                self.store.call(
                    f"tag {model} v{version}",
                    lambda m=model, v=version, s=score: client.set_model_version_tag(
                        m, str(v), f"{split}_alignment", f"{s:.4f}"
                    ),
                )
        self.store.call("end run", lambda: client.set_terminated(run_id, "FINISHED"))
        return run_id

    def experiment_url(self) -> str:
        """Where the experiment opens in the MLflow UI (on its runs), relative to the UI's address."""
        return f"#/experiments/{self.store.experiment_id()}?{UI_VIEW}"

    def run_url(self, run_id: str, tab: str = "") -> str:
        """Where a run opens in the MLflow UI (on a tab such as `artifacts/report.png`), relative to the UI."""
        path = f"#/experiments/{self.store.experiment_id()}/runs/{run_id}"
        return f"{path}/{tab}?{UI_VIEW}" if tab else f"{path}?{UI_VIEW}"

    def record(self, trials: list[FinishedTrial], winners: dict[str, Winner]) -> list[Registration]:
        """Everything at the end of an experiment: every trial, the winners, the parent run's end."""
        self._parent_run()
        for trial in trials:
            self.trial_finished(trial)
        registered = self.winners_chosen(winners)
        self.experiment_finished()
        return registered

    # --- the registry ---------------------------------------------------------------------------

    def register(self, winner: Winner) -> Registration:
        """Make a winner a version of its culture's model (unless it is one already); promote it if better."""
        client, name = self.store.client(), self.store.model_name(winner.culture)
        meta = load_expert(winner.expert_file).meta

        def ensure_model() -> None:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name, tags={"culture": meta.culture, "iso": meta.iso})

        self.store.call(f"create registered model {name}", ensure_model)
        run_id = self._trial_run(winner.trial_id)
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
            EXPERIMENT_TAG: self.name,
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

    def _parent_note(self, experiment_id: str) -> str:
        """Markdown for the parent run: every trial (linked, with its cultures) and every registered winner."""
        link = f"#/experiments/{experiment_id}/runs/"
        lines = [f"Experiment **{self.name}**.", "", "| trial | cultures | status |", "|---|---|---|"]
        for trial_id, (cultures, status) in sorted(self.trials.items()):
            run = self.runs.get(trial_id, "")
            lines.append(f"| [trial-{trial_id}]({link}{run}) | {', '.join(cultures)} | {status} |")
        if self.registered:
            lines += ["", "| culture | registered | val alignment | champion |", "|---|---|---|---|"]
            for row in self.registered:
                champion = "yes" if row.champion else row.note or "no"
                lines.append(
                    f"| {row.culture} | [{row.model} v{row.version}](#/models/{row.model}/versions/"
                    f"{row.version}) | {row.val_alignment:.4f} | {champion} |"
                )
        return "\n".join(lines)

    # --- runs -----------------------------------------------------------------------------------

    def _parent_run(self) -> str:
        """The experiment's parent run, created once, its config logged once (credentials left out)."""
        if self.parent is None:
            run_id = self._run(EXPERIMENT_TAG, self.name, self.name, None)
            client = self.store.client()
            if "config" not in self.store.call("get run", lambda: client.get_run(run_id)).data.params:
                self._log_params(run_id, {"config": self.config.model_dump(mode="json")})
            self.parent = run_id
        return self.parent

    def _trial_run(self, trial_id: str) -> str:
        """A trial's run, a child of the parent run, created once."""
        if trial_id not in self.runs:
            self.runs[trial_id] = self._run(TRIAL_TAG, trial_id, f"trial-{trial_id}", self._parent_run())
        return self.runs[trial_id]

    def _run(self, tag: str, value: str, name: str, parent_id: str | None) -> str:
        client, experiment_id = self.store.client(), self.store.experiment_id()
        tags = {tag: value, "mlflow.runName": name}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id

        def find_or_create() -> str:
            found = client.search_runs([experiment_id], f"tags.`{tag}` = '{value}'")
            return found[0].info.run_id if found else client.create_run(experiment_id, tags=tags).info.run_id

        return self.store.call(f"open run {name}", find_or_create)

    def _log_params(self, run_id: str, params: dict) -> None:
        client = self.store.client()
        flat = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in params.items()}
        batch = [mlflow.entities.Param(k, redact(str(v))[:6000]) for k, v in flat.items()]
        self.store.call("log params", lambda: client.log_batch(run_id, params=batch))

    def _log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        client, now = self.store.client(), int(time.time() * 1000)
        batch = [
            mlflow.entities.Metric(k.replace("/", "."), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and v == v  # not NaN
        ]
        self.store.call("log metrics", lambda: client.log_batch(run_id, metrics=batch))

    def _log_trial_artifacts(self, run_id: str, trial: FinishedTrial) -> None:
        """A trial's experts (one folder a culture: safetensors + PEFT adapter), its table and its curve."""
        client = self.store.client()
        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp)
            table = {}
            for meta in trial.expert_metas():
                target = staging / "experts" / slug(meta.culture)
                target.mkdir(parents=True)
                shutil.copy2(trial.experts / f"{slug(meta.culture)}.safetensors", target)
                adapter = trial.experts / "peft" / slug(meta.culture)
                if adapter.is_dir():
                    shutil.copytree(adapter, target / "peft")
                table[meta.culture] = meta.training
            (staging / "alignment.json").write_text(json.dumps(table, indent=2))
            if trial.history:
                plot_history(trial.history, staging / "val_alignment.png")
            self.store.call("log artifacts", lambda: client.log_artifacts(run_id, str(staging)))

    def _live_failed(self, err: TrackingError) -> None:
        self.live = False
        print(f"warning: {err}; metrics will be logged from the checkpoints at the end", file=sys.stderr)


class _LiveMetrics(tune.Callback):
    """Hands each trial's epochs to the tracker as Tune receives them."""

    def __init__(self, tracker: ExperimentTracker | None):
        self.tracker = tracker

    def __reduce__(self):
        # Tune saves its callbacks with the experiment (tuner.pkl): the tracker, credentials and all, stays out.
        return (_LiveMetrics, (None,))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.tracker is not None:
            self.tracker.trial_reported(trial.trial_id, result)


def plot_history(history: list[dict], path: Path) -> Path:
    """Validation alignment per culture by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    columns = sorted({k for row in history for k in row if k.startswith("val_alignment/")})
    for column in columns:
        rows = [r for r in history if column in r and r[column] == r[column]]  # NaN: not reported
        ax.plot(
            [r["epoch"] for r in rows], [r[column] for r in rows], marker="o", label=column.split("/", 1)[1]
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation alignment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def trial_cultures(trial: FinishedTrial) -> list[str]:
    """The cultures a trial trained: its experts' or, without a checkpoint, those its epochs reported."""
    cultures = {meta.culture for meta in trial.expert_metas()}
    cultures |= {k.split("/", 1)[1] for row in trial.history for k in row if k.startswith("val_alignment/")}
    return sorted(cultures)


def report_metrics(report: dict) -> dict[str, float]:
    """An evaluation report as flat metrics: `<method>.<culture>` and its `.ci95_low` / `.ci95_high` (and
    `transfer.<method>.<culture>` ... for a transfer section, `rendering.<name>.<method>.overall` ... for each
    rendering, `chat.<part>.<key>` for the chat path)."""
    rows = dict(report["cultures"]) | {"overall": report["overall"]}
    if "held_out" in report:
        rows["held_out"] = report["held_out"]
    metrics: dict[str, float] = {}
    for name, row in rows.items():
        metrics[f"n.{name}"] = row["n"]
        for method in METHODS:
            if row.get(method) is not None:
                metrics[f"{method}.{name}"] = row[method]
        for method, (low, high) in row.get("ci95", {}).items():
            metrics[f"{method}.{name}.ci95_low"], metrics[f"{method}.{name}.ci95_high"] = low, high
    # Each rendering's pooled rows and paired gains: `rendering.<name>.<method>.overall`, ...
    for name, section in report.get("renderings", {}).items():
        for part in ("overall", "held_out"):
            row = section.get(part)
            for method in METHODS if row else ():
                if row.get(method) is not None:
                    metrics[f"rendering.{name}.{method}.{part}"] = row[method]
            for diff, value in (row or {}).get("differences", {}).items():
                if value is not None:
                    metrics[f"rendering.{name}.{diff}.{part}"] = value["mean"]
                    low, high = value["ci95"]
                    metrics[f"rendering.{name}.{diff}.{part}.ci95_low"] = low
                    metrics[f"rendering.{name}.{diff}.{part}.ci95_high"] = high
    # What a chat user gets: `chat.first_token.expert`, `chat.gain_ratio`, `chat.mass_on_options.expert`, ...
    chat = report.get("chat") or {}
    for part in ("first_token", "opinion", "mass_on_options", "sampled"):
        for key, value in chat.get(part, {}).items():
            metrics[f"chat.{part}.{key}"] = value
    if chat.get("gain_ratio") is not None:
        metrics["chat.gain_ratio"] = chat["gain_ratio"]
    if "transfer" in report:  # the transfer split's section, the same metrics under `transfer.`
        metrics |= {f"transfer.{k}": v for k, v in report_metrics(report["transfer"]).items()}
    return metrics


def _version_of(version: ModelVersion | None) -> str | None:
    return None if version is None else str(version.version)
