"""What every benchmark shares: the machine it ran on, the survey file, a tiny model, peak memory, the report."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import platform
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from workers.tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "goqa" / "opinions.jsonl"


def machine() -> str:
    """The GPU's name, or the CPU model, its cores and torch's threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return (
        f"{cpu or platform.processor()}, {psutil.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    )


def model_path(name: str) -> str:
    """`tiny`: a tiny random Llama saved to a temporary folder; anything else is passed through."""
    if name != "tiny":
        return name
    return str(save_tiny_model("llama", Path(tempfile.mkdtemp()) / "tiny-llama"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range, so Ray's processes cannot take it first."""
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(20000, 32768)
        with contextlib.closing(socket.socket()) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class PeakRSS:
    """Peak resident memory of this process above what it held on entry (after a trim), sampled every 5 ms."""

    def __enter__(self):
        # Hand memory freed by the previous variant back to the OS, so each variant starts level.
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.process, self.done = psutil.Process(), False
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.mb = (self.peak - self.start) / 2**20


def seconds_per_row(trainer, batches: list) -> float:
    """Train `trainer` (a PackedTrainer) one optimizer step on each of `batches`: the mean seconds a row.

    A first step is untimed: the first pass allocates."""
    trainer.micro_step(*batches[0], boundary=True)
    trainer.zero_grad()
    tic = time.perf_counter()
    for rows, cultures in batches:
        trainer.micro_step(rows, cultures, boundary=True)
        trainer.optimizer_step(idle=[])
    return (time.perf_counter() - tic) / sum(len(rows) for rows, _ in batches)


def write_report(report: dict, out: str | None) -> None:
    """Print the report as JSON, and write it to `out` too if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
