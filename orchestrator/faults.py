"""Deterministic fault injection: `SHORES_FAULT=<kind>:<group>[:<epoch>]` makes an exact failure happen once.

Kinds (see docs/cluster.md, "Fault injection"):
- `kill-after-checkpoint:<group>:<epoch>`: the trial of culture group <group> SIGKILLs its own process
  right after Tune has taken its epoch-<epoch> checkpoint (what a lost node or an OOM kill does).
- `interrupt-after-trial:<group>`: the driver sends itself SIGINT (Ctrl-C) as soon as the trial of
  culture group <group> has finished.

The driver reads the variable when it builds the experiment and hands the fault to every trial, so it
reaches trial processes on any cluster. A marker file under <output_dir>/faults is created atomically
when the fault fires: the retried trial, or the resumed experiment, does not fire it again.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from orchestrator.config import ConfigError

ENV = "SHORES_FAULT"
KINDS = {"kill-after-checkpoint": 2, "interrupt-after-trial": 1}  # kind -> how many numbers follow it


class FaultError(ConfigError):
    """A SHORES_FAULT value that cannot be used, in one line."""


@dataclass(frozen=True)
class Fault:
    """One fault to inject: its kind, the culture group it hits, the epoch (for a kill), its marker file."""

    kind: str
    group: int
    epoch: int | None
    marker: Path

    @classmethod
    def parse(cls, spec: str, output_dir: str | Path) -> Fault:
        """A fault from its `kind:group[:epoch]` spelling; its marker lives under `output_dir`/faults."""
        kind, *numbers = spec.strip().split(":")
        if kind not in KINDS or len(numbers) != KINDS[kind] or not all(n.isdigit() for n in numbers):
            raise FaultError(
                f"{ENV}={spec!r}: expected kill-after-checkpoint:<group>:<epoch> or interrupt-after-trial:<group>"
            )
        group, epoch = int(numbers[0]), (int(numbers[1]) if len(numbers) > 1 else None)
        name = "-".join([kind, *numbers])
        return cls(kind, group, epoch, Path(output_dir).resolve() / "faults" / name)

    @classmethod
    def from_env(cls, output_dir: str | Path) -> Fault | None:
        """The fault SHORES_FAULT asks for, or None."""
        spec = os.environ.get(ENV, "").strip()
        return cls.parse(spec, output_dir) if spec else None

    def fire_once(self) -> bool:
        """Claim the fault: True the first time only, across processes and retries."""
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.fsync(descriptor)  # on disk before the process dies
        os.close(descriptor)
        return True


def after_checkpoint(fault: Fault | None, group: int, epoch: int) -> None:
    """Called by a trial once Tune has its epoch checkpoint: SIGKILL this process if the fault says so."""
    if fault and fault.kind == "kill-after-checkpoint" and (fault.group, fault.epoch) == (group, epoch):
        if fault.fire_once():
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAfterTrial(tune.Callback):
    """Runs in the driver: Ctrl-C (SIGINT to itself) once the fault's trial has finished."""

    def __init__(self, fault: Fault):
        self.fault = fault

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.config.get("group") == self.fault.group and self.fault.fire_once():
            os.kill(os.getpid(), signal.SIGINT)  # Tune saves the experiment's state and stops


def driver_callbacks(fault: Fault | None) -> list[tune.Callback]:
    """The Tune callbacks a fault needs in the driver."""
    return [InterruptAfterTrial(fault)] if fault and fault.kind == "interrupt-after-trial" else []
