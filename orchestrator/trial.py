"""One Tune trial: a culture group's experts trained packed, checkpointed and reported every epoch.

The trial body (`train_group`) is written once; the strategy only says where it runs:
- `packed`: in the trial process, a `PackedTrainer` on the shared frozen base (on the trial's GPU if any):
  `run_packed`;
- `deepspeed`: on every worker of a Ray Train TorchTrainer that the trial starts, a `ZeroTrainer` with the
  base sharded under ZeRO-3 (`orchestrator.deepspeed_trial`).
Both strategies write the same checkpoint (`TRAINER_STATE` and experts/) and report the same metrics, so
the driver reads them alike. `orchestrator.tune.run_trial` picks the strategy.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args

import numpy as np
import ray
import torch
from ray import tune

from orchestrator.config import ExperimentConfig, SearchKey, searched_config
from orchestrator.encoding import encoded
from orchestrator.expert_bank import initial_bank, prior_train_config, save_experts, training_summary
from orchestrator.faults import Fault, after_checkpoint, before_checkpoint
from orchestrator.survey import ExperimentData
from workers.base_model import FrozenBase
from workers.cultures import SHARED
from workers.deepspeed_config import ensure_extensions_dir
from workers.expert_file import Expert
from workers.shared_base import SharedBase
from workers.trainer import EpochReport, PackedTrainer
from workers.zero import ZeroTrainer

TRAINER_STATE = "trainer.pt"  # in every trial checkpoint, beside experts/: what the trial continues from
EXPERTS = "experts"
SEARCH_KEYS = set(get_args(SearchKey))  # the hyperparameters a trial's params may carry

# (metrics, checkpoint folder or None): how an epoch leaves the process that trained it.
Report = Callable[[dict, Path | None], None]


@dataclass
class TrialSpec:
    """What one trial trains: its config (sampled hyperparameters applied), culture group and data."""

    config: ExperimentConfig
    group: int
    cultures: list[str]
    data: ExperimentData  # cut down to the group's cultures
    resume: dict | None  # the trainer state of the last checkpoint, for a retried or resumed trial
    started: float
    prior: Expert | None = None  # the shared prior, where every expert starts (init: shared)


@dataclass(frozen=True)
class SharedBaseRef:
    """The shared base's ObjectRef as trials get it: `tune.with_parameters` would resolve a bare ref to the
    object, and a trial could then neither hand the ref on (deepspeed) nor say which object it mapped."""

    ref: ray.ObjectRef


def culture_groups(cultures: list[str], experts_per_trial: int) -> list[list[str]]:
    """Cultures in trial-sized groups, in order."""
    return [cultures[i : i + experts_per_trial] for i in range(0, len(cultures), experts_per_trial)]


def expert_groups(data: ExperimentData, experts_per_trial: int) -> list[list[str]]:
    """Every trial's experts: the shared prior alone first (it has the most rows: it runs longest), then
    the cultures in trial-sized groups."""
    prior = [[SHARED]] if SHARED in data.experts else []
    return prior + culture_groups(data.selection.trained, experts_per_trial)


def trial_config(config: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The experiment config with one trial's sampled hyperparameters applied."""
    sampled = {k: v for k, v in params.items() if k in SEARCH_KEYS}
    # Each sample of the search trains with its own seed, so repeated samples are not repeated runs.
    sampled["seed"] = config.train.seed + int(params.get("sample", 0))
    return searched_config(config, sampled)  # validated: a sampled value the config would refuse fails here


def group_data(data: ExperimentData, cultures: list[str]) -> ExperimentData:
    """The experiment data cut down to one culture group: what a trial needs, and no more."""
    wanted = set(cultures)
    return replace(
        data,
        records=[r for r in data.records if r.culture in wanted],
        splits={s: [r for r in records if r.culture in wanted] for s, records in data.splits.items()},
        pooled=data.pooled if SHARED in wanted else {},
    )


def trial_spec(
    params: dict, config: ExperimentConfig, data: ExperimentData, prior: Expert | None = None
) -> TrialSpec:
    """The trial Tune is running now: its culture group, and the state to continue from if it has one."""
    config = trial_config(config, params)
    cultures = expert_groups(data, config.tune.experts_per_trial)[params["group"]]
    if cultures == [SHARED] and config.shared.train.model_fields_set:
        config = config.model_copy(update={"train": prior_train_config(config)})
    checkpoint = tune.get_checkpoint()
    resume = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = load_trainer_state(Path(folder))
    data = group_data(data, cultures)
    return TrialSpec(config, params["group"], cultures, data, resume, time.time(), prior)


def save_checkpoint(
    folder: Path, state: dict, trainer: PackedTrainer, spec: TrialSpec, described: FrozenBase
) -> None:
    """Write a trial checkpoint: the trainer state, then each culture's best expert so far."""
    # The prompts reach the checkpoint before anyone logs anything anywhere.
    torch.save(state, folder / TRAINER_STATE)
    best = trainer.best_bank()
    summary = training_summary(trainer.result(), spec.config)
    save_experts(folder / EXPERTS, best, described, spec.data, summary)


def load_trainer_state(folder: Path) -> dict:
    """The trainer state of a trial checkpoint (plain tensors, numbers and strings only)."""
    return torch.load(folder / TRAINER_STATE, weights_only=True)


def epoch_metrics(epoch: EpochReport, trainer: PackedTrainer, spec: TrialSpec) -> dict:
    """A trial's metrics for one epoch, the same keys for both strategies."""
    flat = epoch.metrics()
    gains = [
        v - trainer.initial_val[c] for c, v in epoch.best_val_alignment.items() if c in trainer.initial_val
    ]
    # Tune's progress table shows a trial's first four metrics: the group's mean and best validation
    # alignment and its gain (what ASHA decides on) come first, the per-culture values after them.
    first = ("epoch", "val_alignment", "best_val_alignment")
    metrics = {k: flat.pop(k) for k in first if k in flat}
    metrics["val_gain"] = float(np.mean(gains)) if gains else 0.0
    metrics |= flat | {f"best_val_alignment/{c}": v for c, v in epoch.best_val_alignment.items()}
    metrics["grad_norm"] = float(np.mean(trainer.grad_norms)) if trainer.grad_norms else float("nan")
    gpu_ids = ray.get_gpu_ids()
    # Tune's own `pid` is the trial process's; `worker_pid` is the process that trained (rank 0's), and
    # `node_id` the Ray node it ran on.
    return metrics | {
        "strategy": spec.config.strategy,
        "num_workers": trainer.world,
        "worker_pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "started": spec.started,
        "gpu_id": float(gpu_ids[0]) if gpu_ids else -1.0,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "device": str(trainer.device),
    }


def train_group(spec: TrialSpec, shared: SharedBase, report: Report, ds: dict | None = None) -> None:
    """The trial body: encode the group's data, train its bank, and checkpoint and report every epoch.

    `ds` None: a PackedTrainer in this process. A DeepSpeed config: this process is one Ray Train worker
    of a ZeRO trial (every worker runs this; rank 0 writes the checkpoint).
    """
    config, cultures = spec.config, spec.cultures
    if ds is None:
        base = shared.materialise("cuda" if ray.get_gpu_ids() else "cpu")
        described = base
    else:
        ensure_extensions_dir()
        base = shared.materialise("cpu")  # zero-copy; DeepSpeed moves each worker's shard to its device
        # The experts' metadata reads the base's shape, which ZeRO-3 hides: an empty skeleton has it.
        described = FrozenBase(base.name, _skeleton(shared), base.tokenizer, base.fingerprint)
    length = config.data.max_length
    train, val = (encoded(base, spec.data, split, cultures, length) for split in ("train", "val"))
    bank = initial_bank(base, cultures, config, spec.prior)
    if ds is None:
        trainer = PackedTrainer(base, bank, train, val, config.train)
    else:
        trainer = ZeroTrainer(base, bank, train, val, config.train, ds=ds)
    if spec.resume is not None:
        trainer.load_state_dict(spec.resume)

    def on_epoch(epoch: EpochReport, trainer: PackedTrainer) -> None:
        metrics = epoch_metrics(epoch, trainer, spec)
        state = trainer.state_dict()  # ZeRO: gathers the shards, so every worker takes part
        if trainer.rank != 0:
            report(metrics, None)  # every worker reports every epoch; rank 0's metrics and checkpoint count
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), state, trainer, spec, described)
            report(metrics, Path(folder))

    trainer.fit(on_epoch)


def report_to_tune(spec: TrialSpec, fault: Fault | None, metrics: dict, checkpoint: tune.Checkpoint) -> None:
    """Hand one epoch to Tune; an injected fault may fail this trial before, or kill it after, the checkpoint."""
    before_checkpoint(fault, spec.group, int(metrics["epoch"]))
    tune.report(metrics, checkpoint=checkpoint)
    after_checkpoint(fault, spec.group, int(metrics["epoch"]), metrics)


def run_packed(spec: TrialSpec, shared: SharedBaseRef, fault: Fault | None) -> None:
    """A packed trial: train the group in this process, reporting every epoch to Tune.

    The base is mapped zero-copy from this node's object store; the trial reports the object's id as
    `shared_base`.
    """
    mapped = {"shared_base": shared.ref.hex()}

    def report(metrics: dict, folder: Path | None) -> None:
        report_to_tune(spec, fault, metrics | mapped, tune.Checkpoint.from_directory(folder))

    train_group(spec, ray.get(shared.ref), report)


def gpus_per_trial(config: ExperimentConfig) -> float:
    """`auto`: one GPU per trial where the cluster has GPUs, none where it has not."""
    if config.tune.gpus_per_trial != "auto":
        return float(config.tune.gpus_per_trial)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _skeleton(shared: SharedBase):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shared.config)
