"""Ray Tune: every culture group trains concurrently as its own trial on one shared frozen checkpoint.

`run_trial` is the trial function; it runs the group packed (`orchestrator.trial`) or on DeepSpeed workers
(`orchestrator.deepspeed_trial`), as `strategy` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from orchestrator.config import INT_SEARCH_KEYS, ExperimentConfig, Sampler
from orchestrator.deepspeed_trial import TUNE_CPU_SHARE, run_on_train_workers
from orchestrator.faults import Fault, driver_callbacks
from orchestrator.survey import ExperimentData
from orchestrator.trial import SharedBaseRef, expert_groups, gpus_per_trial, run_packed, trial_spec
from workers.expert_file import Expert
from workers.shared_base import SharedBase


def domain(key: str, sampler: Sampler):
    """One search-space entry as Tune's domain: a grid, or a distribution drawn once per trial."""
    cast = int if key in INT_SEARCH_KEYS else float
    if sampler.form in ("grid", "choice"):
        values = [cast(v) for v in getattr(sampler, sampler.form)]
        return tune.grid_search(values) if sampler.form == "grid" else tune.choice(values)
    low, high = getattr(sampler, sampler.form)
    if key in INT_SEARCH_KEYS:  # Tune's integer domains exclude the upper bound; the config includes it
        sample = tune.randint if sampler.form == "uniform" else tune.lograndint
        return sample(int(low), int(high) + 1)
    return (tune.uniform if sampler.form == "uniform" else tune.loguniform)(low, high)


def param_space(config: ExperimentConfig, n_groups: int) -> dict:
    """Every culture group and sample index (a grid), crossed with the configured search space.

    The sample index is a grid rather than Tune's num_samples so that each sample trains with its own seed
    (train.seed + sample); distributions are drawn once per trial from the searcher's seeded generator.
    """
    space: dict = {
        "group": tune.grid_search(list(range(n_groups))),
        "sample": tune.grid_search(list(range(config.tune.num_samples))),
    }
    return space | {key: domain(key, sampler) for key, sampler in config.tune.search_space.items()}


def expected_trials(config: ExperimentConfig, data: ExperimentData) -> int:
    """How many trials the experiment holds when it has run to the end."""
    n = len(expert_groups(data, config.tune.experts_per_trial)) * config.tune.num_samples
    for sampler in config.tune.search_space.values():
        n *= len(sampler.grid or [None])
    return n


def run_trial(
    params: dict,
    config: ExperimentConfig,
    data: ExperimentData,
    shared: SharedBaseRef,
    fault: Fault | None = None,
    prior: Expert | None = None,
) -> None:
    """The Tune trial function of both strategies: train one culture group, reporting every epoch.

    The base is mapped zero-copy from this node's object store (by the Train workers, for deepspeed); a
    packed trial reports the object's id as `shared_base`.
    """
    spec = trial_spec(params, config, data, prior)
    if spec.config.strategy == "deepspeed":
        run_on_train_workers(spec, shared.ref, fault)
        return
    run_packed(spec, shared, fault)


def trial_resources(config: ExperimentConfig) -> dict:
    """The trial process's own resources; a deepspeed trial's Train workers ask for theirs when it starts them."""
    if config.strategy == "deepspeed":
        return {"cpu": TUNE_CPU_SHARE, "gpu": 0}
    return {"cpu": config.tune.cpus_per_trial, "gpu": gpus_per_trial(config)}


def make_trainable(config: ExperimentConfig, data: ExperimentData, shared: SharedBase, **trial: Any):
    """The trial function with its resources; the shared checkpoint and data go into the object store once.

    `trial`: run_trial's other arguments (`fault`, `prior`).
    """
    # One copy in the object store; each trial maps its node's copy zero-copy, or (deepspeed) hands the
    # ref on to its Train workers, which do.
    base = SharedBaseRef(ray.put(shared))
    trainable = tune.with_parameters(run_trial, config=config, data=data, shared=base, **trial)
    return tune.with_resources(trainable, trial_resources(config))


def tuner(
    config: ExperimentConfig,
    data: ExperimentData,
    shared: SharedBase,
    callbacks: list | None = None,
    prior: Expert | None = None,
) -> tune.Tuner:
    """A Tuner for the experiment: ASHA (or FIFO) on validation gain, retries from checkpoints.

    A fault named by SHORES_FAULT (orchestrator.faults) is handed to every trial and the driver.
    """
    fault = Fault.from_env(config.output_dir)
    n_groups = len(expert_groups(data, config.tune.experts_per_trial))
    scheduler = None
    if config.tune.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", max_t=config.train.epochs, grace_period=config.tune.grace_period
        )
    return tune.Tuner(
        make_trainable(config, data, shared, fault=fault, prior=prior),
        param_space=param_space(config, n_groups),
        tune_config=tune.TuneConfig(
            # The group's mean gain over its own validation alignment before training, not raw alignment:
            # groups of different cultures start from different levels, and ASHA compares trials across
            # groups. Winners are chosen per culture afterwards, on each culture's own validation alignment.
            metric="val_gain",
            mode="max",
            scheduler=scheduler,
            # Tune ignores max_concurrent_trials beside a search algorithm of this kind: it is set here.
            search_alg=BasicVariantGenerator(
                max_concurrent=config.tune.max_concurrent_trials or 0, random_state=config.train.seed
            ),
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=storage_path(config),
            failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[*(callbacks or []), *driver_callbacks(fault)],
        ),
    )


def storage_path(config: ExperimentConfig) -> str:
    """Where Tune keeps experiments: `tune.storage` (a path or URI), by default <output_dir>/tune."""
    storage = config.tune.storage
    if storage and "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage or Path(config.output_dir) / "tune").resolve())


def experiment_path(config: ExperimentConfig) -> str:
    """The experiment's folder in Tune's storage (a path or a URI), which `restore` continues from."""
    return f"{storage_path(config)}/{config.name}"


def restore(
    config: ExperimentConfig,
    data: ExperimentData,
    shared: SharedBase | None,
    prior: Expert | None = None,
) -> tune.Tuner:
    """The interrupted experiment, to continue: finished trials stay finished, errored ones resume."""
    path = experiment_path(config)
    if not tune.Tuner.can_restore(path):
        raise FileNotFoundError(f"no experiment to resume at {path}")
    fault = Fault.from_env(config.output_dir)
    trainable = make_trainable(config, data, shared, fault=fault, prior=prior) if shared else run_trial
    return tune.Tuner.restore(path, trainable, resume_errored=True)


def trials_ended(config: ExperimentConfig) -> int:
    """How many of the experiment's trials ended (finished, stopped by the scheduler, or failed), as Tune saved
    them. Not the results `fit` returns: those count a trial that Ctrl-C stopped while it ran as terminated."""
    saved = tune.Tuner.restore(experiment_path(config), run_trial).get_results()
    return saved.num_terminated + saved.num_errors
