"""Shared fixtures: tiny random GPT-2 and Llama models with a tokenizer trained here, banks of every prompt kind,
the tests' config, a local Ray, and the survey data."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_config
from workers.tiny_model import save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "goqa"
OPINIONS = SHARED_DATA / "opinions.jsonl"
TINY_CONFIG = REPO / "tests" / "tiny.yaml"  # the tests' config: one epoch-cheap run on a tiny model


def tiny_config(model_dir, out, *overrides):
    """The tests' config on the model in `model_dir`, writing to `out`; and the same settings as CLI `--set` args."""
    sets = [f"base_model.name={model_dir}", f"output_dir={out}", f"data.path={OPINIONS}", *overrides]
    return load_config(TINY_CONFIG, sets), [x for s in sets for x in ("--set", s)]


def config_with(*sets):
    """The tests' config with no model behind it (for what reads the config and data only)."""
    return load_config(TINY_CONFIG, ["base_model.name=unused", f"data.path={OPINIONS}", *sets])


def ray_options(num_cpus: int = 2, **extra) -> dict:
    """`ray.init` arguments of every test's Ray: its own local cluster, no dashboard, workers' logs kept quiet."""
    return {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "log_to_driver": False,
        **extra,
    }


def shores_ui_command(port: int, *args: str) -> list[str]:
    """`shores ui` on the tests' config (this interpreter), listening on `port`; `args`: e.g. `--set` pairs."""
    return [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "ui",
        "--config",
        str(TINY_CONFIG),
        *args,
        "--port",
        str(port),
    ]


@contextlib.contextmanager
def running_ray(num_cpus: int = 2, **extra):
    """A local Ray (`ray_options`) for the block, shut down after it."""
    import ray

    ray.init(**ray_options(num_cpus, **extra))
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def local_ray():
    """A local Ray of 2 CPUs for one test (a test's own: fault variables set before it reach its workers)."""
    with running_ray():
        yield


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


@pytest.fixture
def llama_base(llama_dir):
    """The GQA layout (fewer key/value heads than heads) for the training tests; the others take both layouts."""
    from workers.base_model import load_frozen_base

    return load_frozen_base(str(llama_dir), device="cpu")


# Prompts and a bank of three random experts for the decoding tests (static and continuous alike).
PROMPTS = ["Do you think people can be trusted?", "Answer: A", "How important is religion in your life? Very"]
BANK_CULTURES = ["Germany", "Japan", "Kenya"]
PROMPT_KINDS = ["input", "deep", "mixed"]
# (input tokens, deep-prefix tokens) of experts of every kind (input, deep, composed), and of several lengths.
EVERY_KIND = {"Germany": (2, 0), "Japan": (0, 5), "Kenya": (4, 3), "Brazil": (0, 1)}


def pytest_generate_tests(metafunc):
    """Run every test that takes `bank` once per prompt kind, or for the kinds its `prompt_kinds` marker names."""
    if "prompt_kind" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("prompt_kinds")
        metafunc.parametrize("prompt_kind", list(marker.args) if marker else PROMPT_KINDS)


def random_expert(base, culture: str, tokens: int, prefix_tokens: int, seed: int):
    """An expert of random parts: `tokens` input-prompt tokens and a deep prefix of `prefix_tokens` (0: none)."""
    import torch

    from workers.expert_file import Expert, ExpertMeta
    from workers.prefix import kv_shape

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(tokens, base.hidden_size, generator=generator) * 0.5
    layers, kv_heads, head_dim = kv_shape(base.model.config)
    prefix = torch.randn(prefix_tokens, layers, 2, kv_heads, head_dim, generator=generator)
    meta = ExpertMeta(culture, culture[:2].upper(), 0, base.hidden_size, base.name, base.fingerprint)
    return Expert(prompt, meta, prefix if prefix_tokens else None)


def experts_of_every_kind(base) -> list:
    """One random expert per entry of `EVERY_KIND`, in its order."""
    return [random_expert(base, c, n, p, seed) for seed, (c, (n, p)) in enumerate(EVERY_KIND.items())]


@pytest.fixture
def bank(tiny_base, prompt_kind):
    """Three random experts of one prompt kind (`PROMPT_KINDS`): `input` (4 tokens each), `deep` (4-token
    prefixes), or `mixed` (an input, a deep and a composed expert of different lengths: `EVERY_KIND`'s first three).
    """
    from workers.prompts import SoftPromptBank, bank_from_experts

    if prompt_kind == "mixed":
        return bank_from_experts(experts_of_every_kind(tiny_base)[: len(BANK_CULTURES)])
    return SoftPromptBank.initialise(tiny_base, BANK_CULTURES, 4, init="random", seed=5, kind=prompt_kind)


def token_ids(base, text: str) -> list[int]:
    return base.tokenizer.encode(text, add_special_tokens=False)
