"""The driver of a Ray Tune experiment: run the trials, register each culture's best, publish champions."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import yaml
from ray import tune

from orchestrator.calibration import calibrate_winners, uncalibrated
from orchestrator.config import ExperimentConfig, load_config
from orchestrator.deepspeed_trial import validate_deepspeed
from orchestrator.faults import Fault, before_calibration
from orchestrator.publish import publish_experts
from orchestrator.registry import Registration, TrackingError, public_config, restore_credentials
from orchestrator.results import FinishedTrial, best_experts, finished_trials
from orchestrator.survey import ExperimentData, SurveyDataError, prepare_data
from orchestrator.tracking import ExperimentTracker
from orchestrator.trial import expert_groups
from orchestrator.tune import expected_trials, experiment_path, restore, run_trial, trials_ended, tuner
from workers.base_model import FrozenBase, load_frozen_base
from workers.cultures import SHARED
from workers.expert_file import Expert, load_expert
from workers.shared_base import SharedBase


@dataclass(frozen=True)
class TrainOutcome:
    """What `train` (or `register_from`) did: the cultures with a winner, what it registered, what failed."""

    experts: list[str] = field(default_factory=list)  # the cultures whose best expert was picked, sorted
    registered: list[Registration] = field(default_factory=list)  # empty when the store was down
    failed: list[str] = field(default_factory=list)  # the ids of the trials that failed past their retries
    interrupted: bool = False  # Ctrl-C: Tune saved its state, `--resume` continues


def connect() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start Ray here."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, include_dashboard=False)


def train(config: ExperimentConfig, resume: bool = False, replace: bool = False) -> TrainOutcome:
    """Run (or resume) the experiment, then pick, log, register and publish every culture's best expert.

    `replace`: the published set becomes this run's experts alone, instead of the previous set with them.
    """
    validate_deepspeed(config)  # bad DeepSpeed settings fail here, before any worker starts
    data = prepare_data(config.data, shared=config.shared)
    print(f"data: {data.report.summary()}; cultures: {', '.join(data.selection.trained)}", flush=True)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Credentials stay out of the file, the trials and Ray's logs; `register --from` asks for them again.
    public = public_config(config)
    (out / "config.yaml").write_text(yaml.safe_dump(public.model_dump(mode="json"), sort_keys=False))
    tracker = ExperimentTracker(config)
    tracker.experiment_started()
    connect()
    # The driver loads the frozen base once; the object store hands the same copy to every trial.
    shared = SharedBase.load(config.base_model.name, config.base_model.dtype)
    tracker.champions.use_base(
        lambda: shared.materialise("cpu")
    )  # the champion gate re-scores with this copy
    trials, failed, prior = [], [], None
    for stage, stage_data in stages(public, data):
        if resume and tune.Tuner.can_restore(experiment_path(stage)):
            experiment = restore(stage, stage_data, shared, prior)
        else:
            experiment = tuner(stage, stage_data, shared, [tracker.live_metrics()], prior)
        results = experiment.fit()
        if trials_ended(stage) < expected_trials(stage, stage_data):
            # Ctrl-C: Tune saved its state; finished trials stay finished when the experiment resumes.
            print(f"interrupted: continue with `shores train --resume --config ...` ({config.output_dir})")
            return TrainOutcome(failed=failed, interrupted=True)
        stage_trials = finished_trials(results, downloads=checkpoint_downloads(config))
        failed += report_failures(
            config, stage_trials, expert_groups(stage_data, stage.tune.experts_per_trial)
        )
        trials += stage_trials
        if stage is not public:
            if failed:  # every culture starts from the prior: it finishes first
                return TrainOutcome(failed=failed)
            prior = prior_expert(trials)
            if prior is None:  # stopped before its first checkpoint
                print(
                    "the shared prior has no checkpoint yet: continue with `shores train --resume --config ...` "
                    f"({config.output_dir})",
                    file=sys.stderr,
                )
                return TrainOutcome(failed=failed, interrupted=True)
    done = finish(config, data, trials, tracker, replace, lambda: shared.materialise("cpu"))
    return TrainOutcome(done.experts, done.registered, failed)


def report_failures(
    config: ExperimentConfig, trials: list[FinishedTrial], groups: list[list[str]]
) -> list[str]:
    """Say, one line each on stderr, which trials failed past their retries, why, and what to do; their ids."""
    for trial in trials:
        if not trial.failed:
            continue
        experts = ", ".join(groups[int(trial.params.get("group", 0))])
        advice = (
            " (out of memory); lower train.batch_size and raise train.grad_accum as much (the same rows a "
            "step, less memory at once)"
            if trial.out_of_memory
            else ""
        )
        print(
            f"trial {trial.trial_id} ({experts}) failed: {trial.error}{advice}; continue it from its last "
            f"checkpoint with `shores train --resume --config ...` ({config.output_dir}): the others stay finished",
            file=sys.stderr,
        )
    return [t.trial_id for t in trials if t.failed]


def stages(config: ExperimentConfig, data: ExperimentData) -> list[tuple[ExperimentConfig, ExperimentData]]:
    """The Tune experiments to run in turn: one, or (init: shared) the prior's alone and then the cultures'.

    The prior's stage is a Tune experiment of its own, `<name>-shared`, so each stage resumes on its own.
    """
    if config.prompt.init != SHARED:
        return [(config, data)]
    prior_only = replace(data, selection=replace(data.selection, trained=[]))
    # The prior itself starts from its culture-blind persona.
    persona = config.prompt.model_copy(update={"init": "persona"})
    cpus = config.shared.cpus_per_trial or config.tune.cpus_per_trial
    alone = config.tune.model_copy(update={"cpus_per_trial": cpus})
    prior_stage = config.model_copy(
        update={"name": prior_stage_name(config), "prompt": persona, "tune": alone}
    )
    return [(prior_stage, prior_only), (config, replace(data, pooled={}))]


def prior_stage_name(config: ExperimentConfig) -> str:
    return f"{config.name}-{SHARED}"


def prior_expert(trials: list[FinishedTrial]) -> Expert | None:
    """The shared prior's best expert among the finished trials (where every culture's expert starts)."""
    winner = best_experts(trials).get(SHARED)
    return None if winner is None else load_expert(winner.expert_file)


def finish(
    config: ExperimentConfig,
    data: ExperimentData,
    trials: list[FinishedTrial],
    tracker: ExperimentTracker,
    replace: bool = False,
    load_base: Callable[[], FrozenBase] | None = None,
) -> TrainOutcome:
    """Log and register each culture's best expert, then publish the champions among them.

    The registry decides what is served: a winner that does not beat its culture's champion leaves the
    published expert in place (`replace` publishes every winner). A culture without a winner keeps its
    published expert. With the store down, every winner is published; `shores register --from` and
    `shores publish --from-registry` bring the registry and the folder together again.
    """
    winners = best_experts(trials)
    before_calibration(Fault.from_env(config.output_dir))
    if load_base is not None:  # the prior's share in each expert's answers, before anyone reads the files
        calibrate_winners(config, data, winners, load_base)
    missing = [c for c in data.experts if c not in winners]
    if missing:
        print(
            f"warning: no finished trial holds an expert for {missing}; they keep their published experts",
            file=sys.stderr,
        )
    registered = record(config, tracker, trials, winners)
    published = dict(winners)
    if registered and not replace:
        for row in registered:
            if not row.champion:
                del published[row.culture]
                why = row.note or "the champion validates better"
                print(f"{row.culture}: keeping the published expert ({row.model} v{row.version}: {why})")
    if published:
        publish_experts(config.experts_dir, published, data, replace=replace)
    return TrainOutcome(sorted(winners), registered)


def checkpoint_downloads(config: ExperimentConfig) -> Path:
    """Where the driver downloads the trials' checkpoints when Tune's storage is remote (s3://, gs://)."""
    return Path(config.output_dir) / "checkpoints"


def record(
    config: ExperimentConfig, tracker: ExperimentTracker, trials: list, winners: dict
) -> list[Registration]:
    """Log and register the experiment; a store that stays down is a warning: the experts are safe."""
    try:
        registered = tracker.record(trials, winners)
    except TrackingError as err:
        print(
            f"warning: {err}\nthe experts are safe in {config.experts_dir} and the checkpoints; log and register "
            f"them later with: shores register --from {config.output_dir}",
            file=sys.stderr,
        )
        return []
    for row in registered:
        mark = " (champion)" if row.champion else f" ({row.note})" if row.note else ""
        print(f"registered {row.model} v{row.version}: val alignment {row.val_alignment:.4f}{mark}")
    return registered


def register_from(output_dir: Path, original: ExperimentConfig | None = None) -> TrainOutcome:
    """Log and register an experiment from its checkpoints (after an MLflow outage, say): what training would
    have registered.

    Winners whose files lack the prior's weights (a driver stopped before it calibrated them, or checkpoints
    downloaded again from remote storage) are calibrated first, as `finish` does: the same function on the
    same data and splits. The experts directory is left as it is: a later experiment may have published its
    own since.
    Credentials of the MLflow store come from `original` (the config the experiment was started with)
    or the MLFLOW_TRACKING_URI variable, as the saved config.yaml keeps none.
    """
    config = restore_credentials(load_config(output_dir / "config.yaml"), original)
    path = experiment_path(config)
    if not tune.Tuner.can_restore(path):
        raise FileNotFoundError(f"no Tune experiment at {path}")
    trials = []
    prior_stage = experiment_path(config.model_copy(update={"name": prior_stage_name(config)}))
    for stage in (prior_stage, path):
        if tune.Tuner.can_restore(stage):
            results = tune.Tuner.restore(stage, run_trial).get_results()
            trials += finished_trials(results, downloads=checkpoint_downloads(config))
    winners = best_experts(trials)
    if not winners:
        print(f"warning: no finished trial of {path} holds an expert", file=sys.stderr)
    calibrate_pending(config, winners)
    return TrainOutcome(sorted(winners), record(config, ExperimentTracker(config), trials, winners))


def calibrate_pending(config: ExperimentConfig, winners: dict) -> None:
    """Write the prior's weights into the winners' files that lack them, from the experiment's own data (its
    `val` split, as training splits it); one clear line if that data cannot be read."""
    pending = uncalibrated(config, winners)
    if not pending:
        return
    print(f"calibrating {', '.join(pending)}: their files lack the prior's weights", flush=True)
    try:
        data = prepare_data(config.data, shared=config.shared)
    except (SurveyDataError, OSError) as err:
        raise SurveyDataError(
            f"{', '.join(pending)} lack the prior's weights (shared.expert_prior_weight), fitted on the "
            f"experiment's val split, and its data cannot be read: {err}"
        ) from err
    section = config.base_model
    calibrate_winners(
        config, data, winners, lambda: load_frozen_base(section.name, section.dtype, section.device)
    )
