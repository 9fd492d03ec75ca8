"""`strategy: deepspeed`: each Tune trial is a Ray Train TorchTrainer whose workers hold the frozen base under ZeRO.

Ray Train V2 cannot be handed to a Tuner directly: the Tune trial is a function that builds and fits a
TorchTrainer itself. The trial holds a small CPU share and the Train workers the rest of the trial's
CPUs (one GPU each where the cluster has GPUs); each worker builds the frozen base from the shared
checkpoint and trains the culture group's prompt bank with `workers.zero.ZeroTrainer`. Rank 0 writes the
same checkpoint a packed trial writes (trainer.pt and experts/) and the same metrics; a Train callback
hands them to the trial, which reports them to Tune, so the driver reads both strategies alike.
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune
from ray.train import UserCallback

from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.experiment import ExperimentData, encode, training_summary
from orchestrator.experts import save_experts
from workers.base_model import FrozenBase
from workers.prompts import SoftPromptBank
from workers.shared_base import SharedBase
from workers.trainer import EpochReport, PackedTrainer
from workers.zero import base_max_change, build_zero_trainer, ds_config, ensure_extensions_dir

TUNE_CPU_SHARE = 0.1  # what the trial function itself holds (zero is refused): it only waits and relays
PLACEMENT_GROUP_FILE = "placement_group"


def trial_resources(config: ExperimentConfig) -> dict:
    """The Tune trial's own resources; its Train workers ask for theirs when the trial starts them."""
    return {"cpu": TUNE_CPU_SHARE, "gpu": 0}


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
    batch_sizes = config.tune.search_space.get("batch_size") or [config.train.batch_size]
    try:
        for batch_size in batch_sizes:
            train = config.train.model_copy(update={"batch_size": int(batch_size)})
            trial_ds_config(config.model_copy(update={"train": train}), config.tune.experts_per_trial)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def group_data(data: ExperimentData, cultures: list[str]) -> ExperimentData:
    """The experiment data cut down to one culture group: what a trial's workers need, and no more."""
    wanted = set(cultures)
    return replace(
        data,
        records=[r for r in data.records if r.culture in wanted],
        splits={s: [r for r in records if r.culture in wanted] for s, records in data.splits.items()},
    )


def epoch_metrics(epoch: EpochReport, trainer: PackedTrainer) -> dict:
    """A trial's metrics for one epoch (the keys a packed trial reports)."""
    metrics = epoch.metrics()
    metrics |= {f"best_val_alignment/{c}": v for c, v in epoch.best_val_alignment.items()}
    gains = [
        v - trainer.initial_val[c] for c, v in epoch.best_val_alignment.items() if c in trainer.initial_val
    ]
    metrics["val_gain"] = float(np.mean(gains)) if gains else 0.0
    if trainer.grad_norms:
        metrics["grad_norm"] = float(np.mean(trainer.grad_norms))
    return metrics


def train_trial_deepspeed(params: dict, config: ExperimentConfig, data: ExperimentData, shared) -> None:
    """One Tune trial with `strategy: deepspeed`: train its culture group on a TorchTrainer, reporting every epoch.

    `shared` is the SharedBase, or better an ObjectRef to it: the workers map a ref zero-copy, while
    a SharedBase object is put into the object store once more here.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from orchestrator.tune import culture_groups, gpus_per_trial, trial_config

    started = time.time()
    config = trial_config(config, params)
    cultures = culture_groups(data.selection.trained, config.tune.experts_per_trial)[params["group"]]
    ds = trial_ds_config(config, len(cultures))  # bad settings fail here, before any worker starts
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a retried or resumed trial continues from its last epoch
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "trainer.pt", weights_only=False)
    shared_ref = shared if isinstance(shared, ray.ObjectRef) else ray.put(shared)
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
        train_workers,
        train_loop_config={
            "config": config,
            "data": group_data(data, cultures),
            "cultures": cultures,
            "shared": shared_ref,
            "ds": ds,
            "resume": resume,
            "started": started,
            "check_base": bool(params.get("check_base")),  # tests: report base_max_change (gathers the base)
            "relay": relay,
        },
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
        _fit_and_relay(trainer, relay, runs / PLACEMENT_GROUP_FILE)
    finally:
        shutil.rmtree(runs / attempt, ignore_errors=True)  # Tune holds copies of the checkpoints


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


def _fit_and_relay(trainer, relay, record: Path) -> None:
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
            tune.report(metrics, checkpoint=checkpoint)
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


def train_workers(loop: dict) -> None:
    """One Ray Train worker: build the frozen base and the trainer, train, and (rank 0) checkpoint each epoch."""
    import ray.train

    ensure_extensions_dir()
    rank = ray.train.get_context().get_world_rank()
    group = ray.util.get_current_placement_group()
    if rank == 0 and group is not None:
        loop["relay"].put(("placement_group", group.id.hex()))
    config: ExperimentConfig = loop["config"]
    data: ExperimentData = loop["data"]
    cultures: list[str] = loop["cultures"]
    shared: SharedBase = ray.get(loop["shared"])
    base = shared.materialise("cpu")  # zero-copy; DeepSpeed moves each worker's shard to its device
    length = config.data.max_length
    train = {c: encode(base, r, length) for c, r in data.records_of("train", cultures).items()}
    val = {c: encode(base, r, length) for c, r in data.records_of("val", cultures).items()}
    # The experts' metadata reads the base's shape, which ZeRO-3 hides: an empty skeleton has it.
    skeleton = FrozenBase(base.name, _skeleton(shared), base.tokenizer, base.fingerprint)
    trainer = build_zero_trainer(
        base,
        cultures,
        train,
        val,
        config.train.trainer_config(),
        loop["ds"],
        config.prompt.num_virtual_tokens,
        config.prompt.init,
    )
    if loop["resume"] is not None:
        trainer.load_state_dict(loop["resume"])
    gpu_ids = ray.get_gpu_ids()

    def report(epoch: EpochReport, trainer: PackedTrainer) -> None:
        metrics = epoch_metrics(epoch, trainer)
        metrics |= {
            "gpu_id": float(gpu_ids[0]) if gpu_ids else -1.0,
            "pid": os.getpid(),
            "started": loop["started"],
        }
        metrics |= {
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(trainer.engine.device),
        }
        # Tune's own `pid` is the trial's; `worker_pid` is rank 0's.
        metrics |= {"strategy": "deepspeed", "num_workers": trainer.world, "worker_pid": os.getpid()}
        state = trainer.state_dict()  # gathers the shards: every worker takes part
        if loop.get("check_base"):
            metrics["base_max_change"] = base_max_change(trainer, shared.tensors)
        if rank != 0:
            ray.train.report(
                metrics
            )  # every worker reports every epoch; rank 0's checkpoint and metrics count
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / "trainer.pt")
            best = SoftPromptBank(cultures, torch.stack([trainer.best_prompts[c] for c in cultures]))
            summary = training_summary(trainer.result(), config)
            save_experts(Path(folder) / "experts", best, skeleton, data, summary, similarity=False)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    trainer.fit(report)


def _skeleton(shared: SharedBase):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shared.config)
