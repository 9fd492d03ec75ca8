"""A DeepSpeed trial: the trial body on the workers of a Ray Train TorchTrainer, each epoch relayed to Tune.

Ray Train V2 cannot be handed to a Tuner, so the trial function fits the TorchTrainer itself, holding a
small CPU share while its workers hold the rest; every worker runs `orchestrator.trial.train_group` with a
`ZeroTrainer`, rank 0 checkpoints, and a Train callback relays each epoch to the trial, which reports it to
Tune.
"""

from __future__ import annotations

import queue as queue_module
import shutil
import threading
import uuid
from pathlib import Path

import ray
from ray import tune
from ray.train import UserCallback

from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.faults import Fault
from orchestrator.trial import TrialSpec, gpus_per_trial, report_to_tune, train_group
from workers.deepspeed_config import ds_config

TUNE_CPU_SHARE = 0.1  # what a deepspeed trial function itself holds (zero is refused): it only relays
PLACEMENT_GROUP_FILE = "placement_group"


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


def run_on_train_workers(spec: TrialSpec, shared: ray.ObjectRef, fault: Fault | None) -> None:
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
