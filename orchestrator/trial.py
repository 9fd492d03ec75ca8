"""One Tune trial: a culture group's experts trained packed, checkpointed and reported every epoch.

The trial body (`train_group`) is written once; the strategy only says where it runs:
- `packed`: in the trial process, a `PackedTrainer` on the shared frozen base (on the trial's GPU if any);
- `deepspeed`: on every worker of a Ray Train TorchTrainer that the trial starts, a `ZeroTrainer` with the
  base sharded under ZeRO-3. Ray Train V2 cannot be handed to a Tuner, so the trial function fits the
  TorchTrainer itself, holding a small CPU share while its workers hold the rest; rank 0 checkpoints, and
  a Train callback relays each epoch to the trial, which reports it to Tune.
Both strategies write the same checkpoint (`TRAINER_STATE` and experts/) and report the same metrics, so
the driver reads them alike.
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args

import numpy as np
import ray
import torch
from ray import tune
from ray.train import UserCallback

from orchestrator.config import ConfigError, ExperimentConfig, SearchKey, searched_config
from orchestrator.experiment import encoded, initial_bank, prior_train_config, training_summary
from orchestrator.experts import save_experts
from orchestrator.faults import Fault, after_checkpoint, before_checkpoint
from orchestrator.survey import ExperimentData
from workers.base_model import FrozenBase
from workers.cultures import SHARED
from workers.deepspeed_config import ds_config, ensure_extensions_dir
from workers.expert_file import Expert
from workers.shared_base import SharedBase
from workers.trainer import EpochReport, PackedTrainer
from workers.zero import ZeroTrainer

TRAINER_STATE = "trainer.pt"  # in every trial checkpoint, beside experts/: what the trial continues from
EXPERTS = "experts"
TUNE_CPU_SHARE = 0.1  # what a deepspeed trial function itself holds (zero is refused): it only relays
PLACEMENT_GROUP_FILE = "placement_group"
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
    if cultures == [SHARED] and config.shared.train:
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
        _run_on_train_workers(spec, shared.ref, fault)
        return
    mapped = {"shared_base": shared.ref.hex()}

    def report(metrics: dict, folder: Path | None) -> None:
        report_to_tune(spec, fault, metrics | mapped, tune.Checkpoint.from_directory(folder))

    train_group(spec, ray.get(shared.ref), report)


def gpus_per_trial(config: ExperimentConfig) -> float:
    """`auto`: one GPU per trial where the cluster has GPUs, none where it has not."""
    if config.tune.gpus_per_trial != "auto":
        return float(config.tune.gpus_per_trial)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def trial_resources(config: ExperimentConfig) -> dict:
    """The trial process's own resources; a deepspeed trial's Train workers ask for theirs when it starts them."""
    if config.strategy == "deepspeed":
        return {"cpu": TUNE_CPU_SHARE, "gpu": 0}
    return {"cpu": config.tune.cpus_per_trial, "gpu": gpus_per_trial(config)}


# ---- deepspeed: the trial runs the body on Ray Train workers ----


def worker_cpus(config: ExperimentConfig) -> float:
    """Each Train worker's CPUs: the trial's `tune.cpus_per_trial` in all, less the trial's own share."""
    return max(0.01, (config.tune.cpus_per_trial - TUNE_CPU_SHARE) / config.deepspeed.num_workers)


def trial_ds_config(config: ExperimentConfig, n_experts: int) -> dict:
    """The validated DeepSpeed config of a trial training `n_experts` experts (ValueError naming the setting)."""
    return ds_config(
        config.deepspeed,
        batch_rows=n_experts * config.train.batch_size,
        grad_accum=config.train.grad_accum,
        dtype=config.base_model.dtype,
    )


def validate_deepspeed(config: ExperimentConfig) -> None:
    """Reject bad DeepSpeed settings before anything starts: a ConfigError, one line naming the setting.

    Checks the DeepSpeed config every trial of the experiment will get (each batch size of the search
    space), with DeepSpeed's own config check. Does nothing unless `strategy` is deepspeed.
    """
    if config.strategy != "deepspeed":
        return
    sampler = config.tune.search_space.get("batch_size")
    if sampler is None:
        batch_sizes = [config.train.batch_size]
    elif sampler.form in ("grid", "choice"):
        batch_sizes = getattr(sampler, sampler.form)
    else:  # every batch size the distribution can draw
        low, high = getattr(sampler, sampler.form)
        batch_sizes = range(int(low), int(high) + 1)
    try:
        for batch_size in batch_sizes:
            train = config.train.model_copy(update={"batch_size": int(batch_size)})
            trial_ds_config(config.model_copy(update={"train": train}), config.tune.experts_per_trial)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _run_on_train_workers(spec: TrialSpec, shared: ray.ObjectRef, fault: Fault | None) -> None:
    """Fit a TorchTrainer whose workers run `train_group` under ZeRO, relaying each epoch to Tune."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    config = spec.config
    ds = trial_ds_config(config, len(spec.cultures))  # bad settings fail here, before any worker starts
    use_gpu = gpus_per_trial(config) > 0
    # Ray Train's own storage for this trial, outside Tune's folders (Tune copies each checkpoint it is
    # handed); on a cluster, output_dir must be shared, as Tune's storage must.
    runs = train_runs_dir(config, tune.get_context().get_trial_id())
    remove_leftover_workers(runs / PLACEMENT_GROUP_FILE)
    for leftover in runs.glob("attempt-*"):  # from an attempt whose process died
        shutil.rmtree(leftover, ignore_errors=True)
    attempt = f"attempt-{uuid.uuid4().hex[:8]}"  # a retried trial resumes from Tune's checkpoint, not Train's
    relay = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec, "shared": shared, "ds": ds, "relay": relay},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.deepspeed.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": worker_cpus(config)} | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=RunConfig(
            name=attempt,
            storage_path=str(runs),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[_RelayToTune(relay)],
        ),
    )
    try:
        _fit_and_relay(trainer, relay, runs / PLACEMENT_GROUP_FILE, spec, fault)
    finally:
        shutil.rmtree(runs / attempt, ignore_errors=True)  # Tune holds copies of the checkpoints


def _train_worker(loop: dict) -> None:
    """One Ray Train worker: announce the workers' placement group (rank 0), then run the trial body."""
    import ray.train

    group = ray.util.get_current_placement_group()
    if ray.train.get_context().get_world_rank() == 0 and group is not None:
        loop["relay"].put(("placement_group", group.id.hex()))

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    train_group(loop["spec"], ray.get(loop["shared"]), report, ds=loop["ds"])


def train_runs_dir(config: ExperimentConfig, trial_id: str) -> Path:
    """Where a deepspeed trial's Ray Train runs keep their checkpoints until Tune has copied them."""
    folder = Path(config.output_dir).resolve() / "train" / config.name / trial_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_leftover_workers(record: Path) -> None:
    """Free the placement group of a Train run whose trial process is gone or going (its id is in `record`).

    The Train controller dies with the trial process that started it (killed, or stopped by Tune), and
    its workers with it, but their placement group stays until Ray Train's cleaner notices, which it
    cannot where its state API is unavailable (no dashboard, or several Ray clusters on one machine):
    other trials, and this one's retry, would then wait forever for those resources.
    """
    if not record.exists():
        return
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    group = PlacementGroup(ray.PlacementGroupID.from_hex(record.read_text().strip()))
    if placement_group_table(group).get("state") not in (None, "REMOVED"):
        remove_placement_group(group)
    record.unlink()


def _fit_and_relay(trainer, relay, record: Path, spec: TrialSpec, fault: Fault | None) -> None:
    """Fit the TorchTrainer in a thread while this one reports each epoch to Tune as the workers send it.

    The workers' placement group is written to `record` while they run, for `remove_leftover_workers`.
    """
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the trial below: Tune retries it from its checkpoint
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="deepspeed-fit", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, *item = relay.get(timeout=0.5)
            except queue_module.Empty:
                if thread.is_alive():
                    continue
                break
            if kind == "placement_group":
                record.write_text(item[0])
                continue
            metrics, checkpoint = item
            checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem) if checkpoint else None
            report_to_tune(spec, fault, metrics, checkpoint)
        thread.join()
    except BaseException:
        # Leaving while the Train run goes on (Tune stops the trial: ASHA, Ctrl-C): the controller dies
        # with this process, but its workers' placement group would stay, holding their resources.
        if thread.is_alive():
            remove_leftover_workers(record)
        raise
    finally:
        relay.shutdown()
        record.unlink(missing_ok=True)
    if "error" in outcome:
        raise outcome["error"]


class _RelayToTune(UserCallback):
    """Runs in the Train controller: passes rank 0's metrics and the saved checkpoint on to the trial."""

    def __init__(self, relay):
        self.relay = relay

    def after_report(self, run_context, metrics, checkpoint):
        self.relay.put(("report", metrics[0], checkpoint))


def _skeleton(shared: SharedBase):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shared.config)
