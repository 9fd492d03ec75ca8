"""MLflow run logging: one tracker records an experiment's runs, from the parent run to its evaluations.

Only the driver talks to MLflow (the store can be a sqlite file on the head node); trials write
checkpoints, and everything logged here can be logged again later from those checkpoints
(`shores register --from`), without duplicates. Every call is retried; a store that stays down costs the
log, never the experts. The tracker logs the parent run, a run per trial (live metrics through a Tune
callback, then settings, experts, table and curve) and each evaluation; the winners it hands to the
registry (`orchestrator.registry`), which registers them and moves the champions.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
from ray import tune

from orchestrator.config import ExperimentConfig
from orchestrator.evaluate import METHODS
from orchestrator.registry import (
    EXPERIMENT_TAG,
    TRIAL_TAG,
    Champions,
    Registration,
    Store,
    TrackingError,
    public_config,
)
from orchestrator.report_view import format_table
from orchestrator.results import FinishedTrial, Winner, tracked_metrics
from workers.base_model import FrozenBase
from workers.cultures import slug
from workers.expert_store import redact

CULTURES_TAG = "shores.cultures"  # on a trial's run: the cultures it trained, comma-separated
SPLIT_TAG = "shores.eval_split"  # on an evaluation's run: the split it scored
# MLflow 3.17's UI decides its view by a global "GenAI | Model training" switch (default GenAI) and ignores
# the tag; a link that carries this query opens the model-training view (runs, metrics, model registry).
UI_VIEW = "workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"  # what the UI shows as a run's description (markdown)


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
        # Registers the winners and moves the champions; `hook` and `base` are its (`Champions.from_config`).
        self.champions = Champions.from_config(config, self.store, hook, base)
        self.name = config.name
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

    def register(self, winner: Winner) -> Registration:
        """Register a winner from its trial's run (`Champions.register`); promote it if it is better."""
        return self.champions.register(winner, self._trial_run)

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
