"""Ray Tune: every culture group trains concurrently as its own trial on one shared frozen checkpoint."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from orchestrator.config import ExperimentConfig
from orchestrator.deepspeed_trial import train_trial_deepspeed, trial_resources
from orchestrator.experiment import ExperimentData, encode, training_summary
from orchestrator.experts import save_experts
from workers.prompts import SoftPromptBank
from workers.shared_base import SharedBase
from workers.trainer import EpochReport, PackedTrainer

# Search-space keys that are integers in the config.
INT_KEYS = {"num_virtual_tokens", "batch_size"}


def culture_groups(cultures: list[str], experts_per_trial: int) -> list[list[str]]:
    """Cultures in trial-sized groups, in order."""
    return [cultures[i : i + experts_per_trial] for i in range(0, len(cultures), experts_per_trial)]


def trial_config(config: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The experiment config with one trial's sampled hyperparameters applied."""
    train = config.train.model_copy(
        update={k: v for k, v in params.items() if k in type(config.train).model_fields}
    )
    prompt = config.prompt.model_copy(
        update={k: int(v) for k, v in params.items() if k == "num_virtual_tokens"}
    )
    return config.model_copy(update={"train": train, "prompt": prompt})


def train_trial(params: dict, config: ExperimentConfig, data: ExperimentData, shared: SharedBase) -> None:
    """One Tune trial: train its culture group packed, checkpointing and reporting every epoch."""
    started = time.time()
    config = trial_config(config, params)
    cultures = culture_groups(data.selection.trained, config.tune.experts_per_trial)[params["group"]]
    gpu_ids = ray.get_gpu_ids()
    base = shared.materialise("cuda" if gpu_ids else "cpu")
    length = config.data.max_length
    train = {c: encode(base, r, length) for c, r in data.records_of("train", cultures).items()}
    val = {c: encode(base, r, length) for c, r in data.records_of("val", cultures).items()}
    bank = SoftPromptBank.initialise(base, cultures, config.prompt.num_virtual_tokens, config.prompt.init)
    trainer = PackedTrainer(base, bank, train, val, config.train.trainer_config())
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a retried or resumed trial continues from its last epoch
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / "trainer.pt", weights_only=False))

    def report(epoch: EpochReport, trainer: PackedTrainer) -> None:
        metrics = epoch.metrics()
        metrics |= {f"best_val_alignment/{c}": v for c, v in epoch.best_val_alignment.items()}
        gains = [
            v - trainer.initial_val[c]
            for c, v in epoch.best_val_alignment.items()
            if c in trainer.initial_val
        ]
        metrics["val_gain"] = float(np.mean(gains)) if gains else 0.0
        metrics |= {"gpu_id": float(gpu_ids[0]) if gpu_ids else -1.0, "pid": os.getpid(), "started": started}
        metrics["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        metrics["device"] = str(base.device)
        with tempfile.TemporaryDirectory() as folder:
            # The prompts reach the checkpoint before anyone logs anything anywhere.
            torch.save(trainer.state_dict(), Path(folder) / "trainer.pt")
            best = SoftPromptBank(
                bank.cultures, torch.stack([trainer.best_prompts[c] for c in bank.cultures])
            )
            summary = training_summary(trainer.result(), config)
            save_experts(Path(folder) / "experts", best, base, data, summary, similarity=False)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    trainer.fit(report)


def gpus_per_trial(config: ExperimentConfig) -> float:
    """`auto`: one GPU per trial where the cluster has GPUs, none where it has not."""
    if config.tune.gpus_per_trial != "auto":
        return float(config.tune.gpus_per_trial)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def param_space(config: ExperimentConfig, n_groups: int) -> dict:
    """Every culture group, crossed with the configured search space (each key a grid)."""
    space: dict = {"group": tune.grid_search(list(range(n_groups)))}
    for key, values in config.tune.search_space.items():
        space[key] = tune.grid_search([int(v) if key in INT_KEYS else float(v) for v in values])
    return space


def expected_trials(config: ExperimentConfig, n_cultures: int) -> int:
    """How many trials the experiment holds when it has run to the end."""
    n = -(-n_cultures // config.tune.experts_per_trial) * config.tune.num_samples
    for values in config.tune.search_space.values():
        n *= len(values)
    return n


def make_trainable(config: ExperimentConfig, data: ExperimentData, shared: SharedBase):
    """The trial function with its resources, the shared checkpoint and data put in the object store once."""
    if config.strategy == "deepspeed":  # the trial holds 0.1 CPU; its Ray Train workers ask for the rest
        trainable = tune.with_parameters(
            train_trial_deepspeed, config=config, data=data, shared=ray.put(shared)
        )
        return tune.with_resources(trainable, trial_resources(config))
    resources = {"cpu": config.tune.cpus_per_trial, "gpu": gpus_per_trial(config)}
    return tune.with_resources(
        tune.with_parameters(train_trial, config=config, data=data, shared=shared), resources
    )


def tuner(
    config: ExperimentConfig, data: ExperimentData, shared: SharedBase, callbacks: list | None = None
) -> tune.Tuner:
    """A Tuner for the experiment: ASHA (or FIFO) on validation gain, retries from checkpoints."""
    n_groups = len(culture_groups(data.selection.trained, config.tune.experts_per_trial))
    scheduler = None
    if config.tune.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", max_t=config.train.epochs, grace_period=config.tune.grace_period
        )
    return tune.Tuner(
        make_trainable(config, data, shared),
        param_space=param_space(config, n_groups),
        tune_config=tune.TuneConfig(
            # Gain over the persona initialisation, not raw alignment: groups of different cultures
            # start from different levels, and ASHA compares trials across groups.
            metric="val_gain",
            mode="max",
            scheduler=scheduler,
            num_samples=config.tune.num_samples,
            max_concurrent_trials=config.tune.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=str(storage_path(config)),
            failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def trial_function(config: ExperimentConfig):
    """The bare trial function of the configured strategy (to read a finished experiment's results)."""
    return train_trial_deepspeed if config.strategy == "deepspeed" else train_trial


def storage_path(config: ExperimentConfig) -> Path:
    return Path(config.output_dir).resolve() / "tune"


def restore(config: ExperimentConfig, data: ExperimentData, shared: SharedBase | None) -> tune.Tuner:
    """The interrupted experiment, to continue: finished trials stay finished, errored ones resume."""
    path = storage_path(config) / config.name
    if not tune.Tuner.can_restore(str(path)):
        raise FileNotFoundError(f"no experiment to resume at {path}")
    trainable = make_trainable(config, data, shared) if shared else trial_function(config)
    return tune.Tuner.restore(str(path), trainable, resume_errored=True)
