"""The driver of a Ray Tune experiment: share the base, run the trials, pick each culture's best, record it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import ray
import yaml
from ray import tune

from orchestrator import tracking
from orchestrator.config import ExperimentConfig, load_config
from orchestrator.experiment import ExperimentData, prepare_data
from orchestrator.experts import slug, write_similarity
from orchestrator.tracking import Store, TrackingError
from orchestrator.trial import run_trial, validate_deepspeed
from orchestrator.tune import expected_trials, restore, storage_path, tuner
from workers.prompts import load_expert
from workers.shared_base import SharedBase

EXPERIMENT_TAG = "shores.experiment"
TRIAL_TAG = "shores.trial_id"


class LiveMetrics(tune.Callback):
    """Logs each trial's epochs to its MLflow run as they arrive; an unreachable store only costs the live view."""

    def __init__(self, store: Store, experiment: str):
        self.store, self.experiment, self.runs, self.down = store, experiment, {}, False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.down:
            return
        try:
            run_id = self.runs.get(trial.trial_id) or trial_run(self.store, self.experiment, trial.trial_id)
            self.runs[trial.trial_id] = run_id
            metrics = {k: v for k, v in result.items() if "alignment" in k or k in ("val_gain", "train_loss")}
            tracking.log_metrics(self.store, run_id, metrics, int(result["epoch"]))
        except TrackingError as err:
            self.down = True
            print(f"warning: {err}; metrics will be logged from the checkpoints at the end", file=sys.stderr)


def parent_run(store: Store, experiment: str) -> str:
    """The experiment's parent run, created once."""
    return tracking.find_run(store, EXPERIMENT_TAG, experiment) or tracking.start_run(
        store, experiment, tags={EXPERIMENT_TAG: experiment}
    )


def trial_run(store: Store, experiment: str, trial_id: str) -> str:
    """A trial's run, a child of the experiment's parent run, created once."""
    return tracking.find_run(store, TRIAL_TAG, trial_id) or tracking.start_run(
        store, f"trial-{trial_id}", parent_run(store, experiment), {TRIAL_TAG: trial_id}
    )


def connect() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start Ray here."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, include_dashboard=False)


def train(config: ExperimentConfig, resume: bool = False) -> dict:
    """Run (or resume) the experiment, then pick, save, log and register every culture's best expert."""
    validate_deepspeed(config)  # bad DeepSpeed settings fail here, before any worker starts
    data = prepare_data(config.data)
    print(f"data: {data.report.summary()}; cultures: {', '.join(data.selection.trained)}", flush=True)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    store = Store.from_config(config)
    connect()
    # The driver loads the frozen base once; the object store hands the same copy to every trial.
    shared = SharedBase.load(config.base_model.name, config.base_model.dtype)
    if resume:
        experiment = restore(config, data, shared)
    else:
        experiment = tuner(config, data, shared, callbacks=[LiveMetrics(store, config.name)])
    results = experiment.fit()
    if results.num_terminated + results.num_errors < expected_trials(config, len(data.selection.trained)):
        # Ctrl-C: Tune saved its state; finished trials stay finished when the experiment resumes.
        print(f"interrupted: continue with `shores train --resume --config ...` ({config.output_dir})")
        return {"experts": [], "registered": [], "interrupted": True}
    return finish(config, data, results, store)


def finish(config: ExperimentConfig, data: ExperimentData, results: tune.ResultGrid, store: Store) -> dict:
    """Copy each culture's best expert to <output_dir>/experts, then log and register everything."""
    winners = best_experts(results)
    missing = [c for c in data.selection.trained if c not in winners]
    if missing:
        print(f"warning: no finished trial holds an expert for {missing}", file=sys.stderr)
    experts_dir = config.experts_dir
    shutil.rmtree(experts_dir, ignore_errors=True)
    experts_dir.mkdir(parents=True)
    for culture, (folder, _) in winners.items():
        shutil.copy2(folder / f"{slug(culture)}.safetensors", experts_dir)
        shutil.copytree(folder / "peft" / slug(culture), experts_dir / "peft" / slug(culture))
    write_similarity(experts_dir, data, sorted(winners))
    print(f"saved {len(winners)} experts to {experts_dir}", flush=True)
    try:
        registered = record(config, results, winners, store)
    except TrackingError as err:
        print(
            f"warning: {err}\nthe experts are safe in {experts_dir} and the checkpoints; log and register them "
            f"later with: shores register --from {config.output_dir}",
            file=sys.stderr,
        )
        return {"experts": sorted(winners), "registered": []}
    for row in registered:
        mark = " (champion)" if row["champion"] else ""
        print(f"registered {row['model']} v{row['version']}: val alignment {row['val_alignment']:.4f}{mark}")
    return {"experts": sorted(winners), "registered": registered}


def best_experts(results: tune.ResultGrid) -> dict[str, tuple[Path, float]]:
    """Per culture, the checkpoint folder of the trial with its best validation alignment."""
    best: dict[str, tuple[Path, float]] = {}
    for result in results:
        if result.checkpoint is None:
            continue
        folder = Path(result.checkpoint.path) / "experts"
        for path in sorted(folder.glob("*.safetensors")):
            meta = load_expert(path).meta
            score = meta.training.get("val_alignment")
            score = float("-inf") if score is None or score != score else float(score)
            if meta.culture not in best or score > best[meta.culture][1]:
                best[meta.culture] = (folder, score)
    return best


def record(config: ExperimentConfig, results: tune.ResultGrid, winners: dict, store: Store) -> list[dict]:
    """Log the experiment and every trial to MLflow, and register each culture's winner."""
    parent = parent_run(store, config.name)
    tracking.log_params(store, parent, {"config": config.model_dump(mode="json")})
    registered = []
    for result in results:
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        run_id = trial_run(store, config.name, trial_id)
        tracking.log_params(store, run_id, {k: v for k, v in (result.config or {}).items()})
        history = result.metrics_dataframe
        logged = store.client().get_metric_history(run_id, "val_gain")
        if history is not None and len(logged) < len(history):
            for row in history.to_dict("records"):
                metrics = {
                    k: v for k, v in row.items() if "alignment" in k or k in ("val_gain", "train_loss")
                }
                tracking.log_metrics(store, run_id, metrics, int(row["epoch"]))
        if result.checkpoint is not None:
            folder = Path(result.checkpoint.path) / "experts"
            log_trial_artifacts(store, run_id, folder, history)
            for culture, (win_folder, score) in winners.items():
                if win_folder == folder:
                    meta = load_expert(folder / f"{slug(culture)}.safetensors").meta
                    tags = {"culture": culture, "iso": meta.iso, "base_fingerprint": meta.base_fingerprint}
                    tags |= {"base_model": meta.base_model, "val_alignment": score, "trial_id": trial_id}
                    path = f"experts/{slug(culture)}"
                    registered.append(tracking.register_expert(store, culture, meta.iso, run_id, path, tags))
        tracking.end_run(store, run_id, "FINISHED" if result.error is None else "FAILED")
    tracking.end_run(store, parent)
    return registered


def log_trial_artifacts(store: Store, run_id: str, folder: Path, history) -> None:
    """A trial's experts (one folder a culture: safetensors + PEFT adapter), its table and its curve."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        table = {}
        for path in sorted(folder.glob("*.safetensors")):
            meta = load_expert(path).meta
            target = staging / "experts" / slug(meta.culture)
            target.mkdir(parents=True)
            shutil.copy2(path, target)
            shutil.copytree(folder / "peft" / slug(meta.culture), target / "peft")
            table[meta.culture] = meta.training
        (staging / "alignment.json").write_text(json.dumps(table, indent=2))
        if history is not None and len(history):
            plot_history(history, staging / "val_alignment.png")
        tracking.log_artifacts(store, run_id, staging)


def plot_history(history, path: Path) -> Path:
    """Validation alignment per culture by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for column in sorted(c for c in history.columns if c.startswith("val_alignment/")):
        ax.plot(history["epoch"], history[column], marker="o", label=column.split("/", 1)[1])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation alignment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def register_from(output_dir: Path) -> dict:
    """Log and register an experiment from its checkpoints (after an MLflow outage, say)."""
    config = load_config(output_dir / "config.yaml")
    data = prepare_data(config.data)
    path = storage_path(config) / config.name
    if not tune.Tuner.can_restore(str(path)):
        raise FileNotFoundError(f"no Tune experiment at {path}")

    results = tune.Tuner.restore(str(path), run_trial).get_results()
    return finish(config, data, results, Store.from_config(config))
