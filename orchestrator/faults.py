"""Deterministic fault injection: `SHORES_FAULT=<kind>:<numbers>` makes an exact failure happen once.

Kinds (see docs/cluster.md, "Fault injection"):
- `kill-after-checkpoint:<group>:<epoch>`: the trial of culture group <group> SIGKILLs its own process
  right after Tune has taken its epoch-<epoch> checkpoint (what a lost node or an OOM kill does).
- `out-of-memory:<group>:<epoch>`: the trial of culture group <group> raises MemoryError at the end of
  epoch <epoch>, before its checkpoint, on every attempt (what a batch too big for the machine does: its
  retries fail too), until the experiment runs without the fault.
- `interrupt-after-trial:<group>`: the driver sends itself SIGINT (Ctrl-C) as soon as the trial of
  culture group <group> has finished.
- `interrupt-after-epoch:<group>:<epoch>`: the driver sends itself SIGINT as soon as it has the epoch-<epoch>
  report (and checkpoint) of the trial of culture group <group>: an interrupt in the middle of a trial, in
  whichever stage runs that group (with `prompt.init: shared`, the prior's stage has group 0 only).
- `interrupt-before-calibration`: the driver stops as Ctrl-C stops it (KeyboardInterrupt) once every trial
  has finished, right before it writes the prior's weights into the winners' files (`shared.expert_prior_weight`):
  nothing is calibrated, registered or published; `shores register --from` registers what training would have.
- `await-node-loss:<epoch>`: the first trial running on a node other than the head, right after Tune has
  taken its epoch-<epoch> checkpoint, writes that epoch's report (JSON) to the marker file and waits for
  its node to be removed (the marker is the signal to remove it). It names no group: the scheduler, not
  the config, picks which group lands on which node.

The driver reads the variable when it builds the experiment and hands the fault to every trial, so it
reaches trial processes on any cluster. A marker file under <output_dir>/faults is created atomically
when the fault fires: the retried trial, or the resumed experiment, does not fire it again.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from orchestrator.config import ConfigError

ENV = "SHORES_FAULT"
# kind -> the numbers that follow it
KINDS = {
    "kill-after-checkpoint": ("group", "epoch"),
    "out-of-memory": ("group", "epoch"),
    "interrupt-after-trial": ("group",),
    "interrupt-after-epoch": ("group", "epoch"),
    "await-node-loss": ("epoch",),
    "interrupt-before-calibration": (),
}
HEAD_RESOURCE = "node:__internal_head__"  # a resource only Ray's head node has
NODE_LOSS_WAIT_S = 600  # a trial awaiting its node's removal gives up (and fails) after this long


class FaultError(ConfigError):
    """A SHORES_FAULT value that cannot be used, in one line."""


@dataclass(frozen=True)
class Fault:
    """One fault to inject: its kind, the group and epoch it hits (where it names them), its marker."""

    kind: str
    group: int | None
    epoch: int | None
    marker: Path

    @classmethod
    def parse(cls, spec: str, output_dir: str | Path) -> Fault:
        """A fault from its `kind:numbers` spelling; its marker lives under `output_dir`/faults."""
        kind, *numbers = spec.strip().split(":")
        if kind not in KINDS or len(numbers) != len(KINDS[kind]) or not all(n.isdigit() for n in numbers):
            spellings = " or ".join(":".join([k, *(f"<{n}>" for n in names)]) for k, names in KINDS.items())
            raise FaultError(f"{ENV}={spec!r}: expected {spellings}")
        values = dict(zip(KINDS[kind], map(int, numbers)))
        name = "-".join([kind, *numbers])
        marker = Path(output_dir).resolve() / "faults" / name
        return cls(kind, values.get("group"), values.get("epoch"), marker)

    @classmethod
    def from_env(cls, output_dir: str | Path) -> Fault | None:
        """The fault SHORES_FAULT asks for, or None; a warning naming the variable whenever it is set."""
        if ENV not in os.environ:
            return None
        spec = os.environ[ENV].strip()
        # A variable leaked from a test session would fail trials on purpose, with advice about a cause
        # (memory, a lost node) that is not the real one: say so every time, before anything runs.
        what = f"injects the fault {spec!r} on purpose" if spec else "is empty: no fault is injected"
        print(f"warning: {ENV} is set: this run {what}; unset {ENV} for a real run", file=sys.stderr)
        return cls.parse(spec, output_dir) if spec else None

    def fire_once(self, note: dict | None = None) -> bool:
        """Claim the fault: True the first time only, across processes, retries; `note` goes in the marker."""
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        if note is not None:
            os.write(descriptor, json.dumps(note, default=str).encode())
        os.fsync(descriptor)  # on disk before the process dies
        os.close(descriptor)
        return True


def before_checkpoint(fault: Fault | None, group: int, epoch: int) -> None:
    """Called by a trial before Tune takes its epoch checkpoint: run out of memory if the fault says so."""
    if fault and fault.kind == "out-of-memory" and (fault.group, fault.epoch) == (group, epoch):
        fault.fire_once()  # only its marker is once: every attempt fails
        raise MemoryError(f"{ENV}=out-of-memory:{group}:{epoch}")


def after_checkpoint(fault: Fault | None, group: int, epoch: int, report: dict | None = None) -> None:
    """Called by a trial once Tune has its epoch checkpoint (and `report`): SIGKILL this process, or await
    the loss of its node, if the fault says so."""
    if fault and fault.kind == "kill-after-checkpoint" and (fault.group, fault.epoch) == (group, epoch):
        if fault.fire_once():
            os.kill(os.getpid(), signal.SIGKILL)
    if fault and fault.kind == "await-node-loss" and fault.epoch == epoch and not on_head_node():
        if fault.fire_once(note=report):
            # Removing the node ends this process. The marker, holding the report (its node id, the
            # shared base it mapped), tells whoever removes the node that it may, and which one.
            threading.Event().wait(NODE_LOSS_WAIT_S)
            raise RuntimeError(f"{ENV}=await-node-loss: the node was not removed in {NODE_LOSS_WAIT_S} s")


def before_calibration(fault: Fault | None) -> None:
    """Called by the driver once its trials are done, before it calibrates the winners: stop there as Ctrl-C
    would, if the fault says so."""
    if fault and fault.kind == "interrupt-before-calibration" and fault.fire_once():
        raise KeyboardInterrupt(f"{ENV}=interrupt-before-calibration")


def on_head_node() -> bool:
    """Whether this process runs on the Ray cluster's head node."""
    here = ray.get_runtime_context().get_node_id()
    return any(node["NodeID"] == here and HEAD_RESOURCE in node["Resources"] for node in ray.nodes())


class InterruptAfterTrial(tune.Callback):
    """Runs in the driver: Ctrl-C (SIGINT to itself) once the fault's trial has finished."""

    def __init__(self, fault: Fault):
        self.fault = fault

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.config.get("group") == self.fault.group and self.fault.fire_once():
            os.kill(os.getpid(), signal.SIGINT)  # Tune saves the experiment's state and stops


class InterruptAfterEpoch(tune.Callback):
    """Runs in the driver: Ctrl-C (SIGINT to itself) once it has the fault's trial's report of the fault's epoch."""

    def __init__(self, fault: Fault):
        self.fault = fault

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # Not on_trial_result: Tune registers an epoch's checkpoint after its result, and a stop in between
        # would lose it. Here the checkpoint is registered before the stop takes effect.
        epoch = int(trial.last_result.get("epoch", 0))
        mine = trial.config.get("group") == self.fault.group and epoch == self.fault.epoch
        if mine and self.fault.fire_once():
            os.kill(os.getpid(), signal.SIGINT)  # Tune saves the experiment's state and stops


def driver_callbacks(fault: Fault | None) -> list[tune.Callback]:
    """The Tune callbacks a fault needs in the driver."""
    kinds = {"interrupt-after-trial": InterruptAfterTrial, "interrupt-after-epoch": InterruptAfterEpoch}
    return [kinds[fault.kind](fault)] if fault and fault.kind in kinds else []
