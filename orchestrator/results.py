"""What an experiment produced: its finished trials, and each culture's best expert among them."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs
import ray.exceptions
from ray import tune

from workers.cultures import slug
from workers.expert_file import ExpertMeta, load_expert

# Metrics a trial's MLflow run keeps (the rest of a Tune result is bookkeeping: pid, device, ...).
TRACKED_METRICS = ("val_gain", "train_loss")


def tracked_metrics(row: dict) -> dict:
    """The alignment, gain and loss figures of one reported epoch."""
    return {k: v for k, v in row.items() if "alignment" in k or k in TRACKED_METRICS}


@dataclass
class FinishedTrial:
    """One trial at the end of the experiment: its id, last checkpoint's experts, settings and history."""

    trial_id: str
    experts: Path | None  # the checkpoint's experts folder; None if it never checkpointed
    params: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one row of metrics an epoch
    error: str | None = None  # what ended it, in one line, if it failed
    out_of_memory: bool = False  # ... and whether that was memory

    @property
    def failed(self) -> bool:
        return self.error is not None

    @classmethod
    def from_result(cls, result: tune.Result, downloads: Path | None = None) -> FinishedTrial:
        """The trial of one Tune result; a checkpoint in remote storage is downloaded under `downloads`."""
        frame = result.metrics_dataframe
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        checkpoint = result.checkpoint
        return cls(
            trial_id=trial_id,
            experts=local_checkpoint(checkpoint, downloads, trial_id) / "experts" if checkpoint else None,
            params=dict(result.config or {}),
            history=frame.to_dict("records") if frame is not None else [],
            error=None if result.error is None else failure_reason(result.error),
            out_of_memory=result.error is not None and out_of_memory(result.error),
        )

    def expert_metas(self) -> list[ExpertMeta]:
        """The metadata of every expert in the trial's checkpoint, by file name."""
        if self.experts is None:
            return []
        return [load_expert(p).meta for p in sorted(self.experts.glob("*.safetensors"))]


@dataclass(frozen=True)
class Winner:
    """A culture's best expert: the trial that trained it, where it lies, and its validation alignment."""

    culture: str
    trial_id: str
    folder: Path  # holds <slug>.safetensors and, from training, peft/<slug>/
    val_alignment: float

    @property
    def expert_file(self) -> Path:
        return self.folder / f"{slug(self.culture)}.safetensors"

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "peft" / slug(self.culture)


def failure_reason(error: BaseException) -> str:
    """What ended a trial, in one line: the trial's own exception where Ray wraps it."""
    cause = error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:  # RayTaskError(...) -> ...
        cause = cause.cause
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def out_of_memory(error: BaseException) -> bool:
    """A trial killed by Ray's memory monitor, or one whose allocation failed (torch's or Python's)."""
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, (MemoryError, ray.exceptions.OutOfMemoryError)) or any(
        mark in text
        for mark in ("memoryerror", "out of memory", "outofmemory", "low on memory", "allocate memory")
    )


def local_checkpoint(checkpoint: tune.Checkpoint, downloads: Path | None, trial_id: str) -> Path:
    """A folder on this machine holding the checkpoint: its own where it is local, else a download of it.

    Tune's storage may be a URI (s3://, gs://): a checkpoint's `path` is then a key in that filesystem.
    """
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    root = downloads or Path(tempfile.mkdtemp(prefix="shores-checkpoints-"))
    return Path(checkpoint.to_directory(root / trial_id / Path(checkpoint.path).name))


def finished_trials(results: tune.ResultGrid, downloads: Path | None = None) -> list[FinishedTrial]:
    """Every trial of a result grid, in order; remote checkpoints are downloaded under `downloads`."""
    return [FinishedTrial.from_result(r, downloads) for r in results]


def best_experts(results: tune.ResultGrid | list[FinishedTrial]) -> dict[str, Winner]:
    """Per culture, the checkpointed trial with its best validation alignment."""
    trials = [t if isinstance(t, FinishedTrial) else FinishedTrial.from_result(t) for t in results]
    best: dict[str, Winner] = {}
    for trial in trials:
        for meta in trial.expert_metas():
            score = meta.training.get("val_alignment")
            score = float("-inf") if score is None or score != score else float(score)
            if meta.culture not in best or score > best[meta.culture].val_alignment:
                best[meta.culture] = Winner(meta.culture, trial.trial_id, trial.experts, score)
    return best
