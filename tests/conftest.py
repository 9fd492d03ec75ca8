"""Shared fixtures: tiny random GPT-2 and Llama models with a tokenizer trained here, and the survey data."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

import pytest

from workers.tiny_model import save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "goqa"
OPINIONS = SHARED_DATA / "opinions.jsonl"


def free_ports(n: int = 1) -> list[int]:
    """n distinct free ports on 127.0.0.1, outside the kernel's ephemeral range and Ray's worker ports.

    A port the kernel handed out (bind to 0) is free only until the test uses it; in between, Ray's own
    processes bind ephemeral ports and can take it. Ports from 20000-32767 are never handed out that way
    (the ephemeral range starts at 32768, Ray's workers use 10002-19999), so only a bind check is needed.
    """
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32768)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


@contextlib.contextmanager
def mlflow_server(port: int, folder: Path):
    """A real `mlflow server` on 127.0.0.1:port with its store in `folder`, ready when entered.

    It waits until the server answers, however long it takes to start; if the server exits first, it fails
    with the end of the server's log. Stopped (and waited for) on exit.
    """
    import subprocess
    import sys
    import time

    import httpx

    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = folder / "mlflow-server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            + ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
            + ["--artifacts-destination", str(folder / "server-artifacts"), "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        while True:  # the process's readiness: it answers /health, or it has exited
            if server.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {server.returncode} before answering: {log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # the next look at a server still starting
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of a tiny random GPT-2 and Llama, loadable by path like any hub model."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_model(family, root / family) for family in ("gpt2", "llama")}


@pytest.fixture(params=["gpt2", "llama"])
def tiny_base(request, tiny_model_dirs):
    """A frozen tiny base model of each layout."""
    from workers.base_model import load_frozen_base

    return load_frozen_base(str(tiny_model_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


# Prompts and a bank of three random experts for the decoding tests (static and continuous alike).
PROMPTS = ["Do you think people can be trusted?", "Answer: A", "How important is religion in your life? Very"]


@pytest.fixture
def bank(tiny_base):
    from workers.prompts import SoftPromptBank

    return SoftPromptBank.initialise(tiny_base, ["Germany", "Japan", "Kenya"], 4, init="random", seed=5)


def token_ids(base, text: str) -> list[int]:
    return base.tokenizer.encode(text, add_special_tokens=False)
