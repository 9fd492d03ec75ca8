"""Helpers for the serving tests: experts with random prompts on a tiny model, a config, a local Serve."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from orchestrator.config import ExperimentConfig
from serve.settings import SERVE_GROUPS
from tests.conftest import OPINIONS, free_ports, running_ray
from workers.base_model import load_frozen_base
from workers.cultures import slug
from workers.expert_file import Expert, ExpertMeta, save_expert
from workers.expert_store import SIMILARITY_FILE
from workers.prompts import SoftPromptBank, persona_text

if TYPE_CHECKING:
    from ray.serve import Deployment

CULTURES = ["Germany", "Japan", "Kenya"]
# Canada and Brazil have no expert: they are answered by committees of their nearest experts.
SIMILARITY = {
    "Canada": {"Germany": 0.9, "Japan": 0.6, "Kenya": 0.7},
    "Brazil": {"Germany": 0.5, "Japan": 0.55, "Kenya": 0.8},
    "Germany": {"Japan": 0.7, "Kenya": 0.6},
    "Japan": {"Germany": 0.7, "Kenya": 0.5},
    "Kenya": {"Germany": 0.6, "Japan": 0.5},
}


def write_experts(
    directory: Path,
    model_dir: Path,
    cultures: list[str],
    seed: int = 0,
    similarity: dict | None = None,
    prior_weight: float = 0.0,
) -> list[Path]:
    """Save one random-prompt expert a culture for the model in `model_dir` (each with `prior_weight`), plus a
    similarity table."""
    base = load_frozen_base(str(model_dir), device="cpu")
    bank = SoftPromptBank.initialise(base, cultures, 4, init="random", seed=seed)
    paths = []
    for i, culture in enumerate(cultures):
        meta = ExpertMeta(
            culture=culture,
            iso=culture[:2].upper(),
            num_virtual_tokens=4,
            hidden_size=base.hidden_size,
            base_model=base.name,
            base_fingerprint=base.fingerprint,
            training={"val_alignment": 0.5 + i / 100},
            descriptor=persona_text(culture),
            prior_weight=prior_weight,
        )
        paths.append(
            save_expert(directory / f"{slug(culture)}.safetensors", Expert(bank.prompts[i].detach(), meta))
        )
    if similarity is not None:
        (directory / SIMILARITY_FILE).write_text(json.dumps(similarity))
    return paths


def pool_settings(model_dir: Path, experts: Path):
    """What an ExpertPool replica needs, for its class used outside Serve: the tiny model, experts in a folder."""
    from serve.pool import PoolSettings
    from workers.expert_store import DirectorySource

    return PoolSettings(
        base_model=str(model_dir),
        dtype="float32",
        device="cpu",
        source=DirectorySource(experts),
        max_rows=8,
        per_expert=False,
        reload_interval_s=0,
    )


def serve_config(model_dir: Path, out: Path, **serve) -> ExperimentConfig:
    """A config for the tiny model with the given `serve` keys (experts in <out>/experts); the keys are given
    flat (`max_new_tokens=16`) and placed in their groups (`serve.limits`)."""
    section: dict[str, dict] = {"limits": {"max_batch_size": 8}}
    for key, value in serve.items():
        section.setdefault(SERVE_GROUPS[key], {})[key] = value
    return ExperimentConfig.model_validate(
        {
            "name": "serve-test",
            "output_dir": str(out),
            "base_model": {"name": str(model_dir), "device": "cpu"},
            "data": {"path": str(OPINIONS), "cultures": CULTURES, "max_length": 128},
            "serve": section,
        }
    )


@contextmanager
def local_serve(
    config: ExperimentConfig,
    num_cpus: int = 4,
    metrics_port: int | None = None,
    pool: Deployment | None = None,
):
    """Ray and Serve on 127.0.0.1 with the graph deployed; yields the base URL; shuts everything down.

    With `metrics_port`, Ray's Prometheus endpoint listens there (http://127.0.0.1:<port>/metrics); with
    `pool`, that deployment serves in place of ExpertPool (`gated_pool()`).
    """
    from ray import serve

    from serve.app import build_app
    from serve.pool import ExpertPool

    (port,) = free_ports(1)
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    with running_ray(num_cpus, **extra):
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config, pool or ExpertPool), name="shores", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()


POOL_GATE = "pool-gate"  # the gate actor that a gated pool's requests wait at before they reach the engine
STEP_GATE = "pool-gate-steps"  # the one that its engine waits at before each decode step
GATE_NAMESPACE = "shores-tests"


def gated_pool() -> Deployment:
    """The ExpertPool deployment with the tests' gates: while the POOL_GATE actor exists, each request waits at
    it before it reaches the engine, and while STEP_GATE exists, the engine waits at it before each decode step
    (a request held mid-decode, so that its client can go away while it runs).

    The engine admits nothing new from before the gate to a request's submission, so requests let through
    together join the running batch together."""
    import asyncio
    from contextlib import asynccontextmanager

    import ray

    from serve.pool import ExpertPool

    async def pass_gate() -> None:
        try:
            gate = ray.get_actor(POOL_GATE, namespace=GATE_NAMESPACE)
        except ValueError:  # no gate up: requests run
            return
        passage = gate.passage.remote()
        try:
            await passage
        except asyncio.CancelledError:  # the router gave up on this request: leave the gate too
            ray.cancel(passage)
            raise

    def pass_step_gate() -> None:  # on the engine thread
        try:
            ray.get(ray.get_actor(STEP_GATE, namespace=GATE_NAMESPACE).passage.remote())
        except Exception:  # noqa: BLE001 - no gate up (ValueError), or it went away: steps run
            return

    class GatedPool(ExpertPool.func_or_class):
        def __init__(self, settings):
            super().__init__(settings)
            self.engine.step_hook = pass_step_gate

        @asynccontextmanager
        async def _admitted(self):
            with self.engine.held():
                await pass_gate()
                yield

    return ExpertPool.options(func_or_class=GatedPool)


class Gate:
    """A Ray actor that a gated pool's requests wait at (`gated_pool`) until the test opens it."""

    def __init__(self) -> None:
        import asyncio

        self.opened = asyncio.Event()
        self.waiting = 0
        self.changed = asyncio.Condition()

    async def passage(self) -> None:
        async with self.changed:
            self.waiting += 1
            self.changed.notify_all()
        try:
            await self.opened.wait()
        finally:
            async with self.changed:
                self.waiting -= 1
                self.changed.notify_all()

    async def until_waiting(self, count: int) -> int:
        """Return once `count` requests wait at the gate (an event, not a poll)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.waiting >= count)
        return self.waiting

    async def until_fewer(self, count: int) -> int:
        """Return once fewer than `count` requests wait (a waiting one was cancelled)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.waiting < count)
        return self.waiting

    def open(self) -> None:
        self.opened.set()


@contextmanager
def closed_gate(name: str):
    """A gate named `name` that pool requests wait at until `.open`; removed on exit (requests then pass)."""
    import ray

    gate = ray.remote(num_cpus=0)(Gate).options(name=name, namespace=GATE_NAMESPACE).remote()
    ray.get(gate.until_waiting.remote(0))  # up before any request looks for it
    try:
        yield gate
    finally:
        ray.get(gate.open.remote())
        ray.kill(gate)


def wait_for(predicate, interval: float = 0.5):
    """Poll until predicate() is truthy and return its value.

    No deadline of its own: what it waits for must happen, however slow the machine; a test that hangs is
    ended by its own timeout (pytest-timeout), which shows where it waited.
    """
    while not (value := predicate()):
        time.sleep(interval)
    return value


def client(url: str, key: str | None = None) -> httpx.Client:
    """An HTTP client with no deadline of its own: the server's (serve.deployment.request_timeout_s) answers a
    stall."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=None)


def replicas(http: httpx.Client, count: int, until=lambda states: True) -> dict[str, dict]:
    """Each pool replica's latest state (/v1/status), by replica id, once `count` replicas have answered and
    `until(states)` holds."""
    states: dict[str, dict] = {}

    def seen() -> bool:
        response = http.get("/v1/status")
        if response.status_code == 200:  # 503 while a replica is replaced
            pool = response.json()["pool"]
            states[pool["replica"]] = pool
        return len(states) >= count and until(states)

    wait_for(seen, interval=0.1)
    return states


def register(config: ExperimentConfig, expert_file: Path, val_alignment: float) -> dict:
    """Log one expert file as a trial's and register it, as training does (champion if better)."""
    import shutil
    import tempfile
    from dataclasses import asdict

    from orchestrator.results import FinishedTrial, Winner
    from orchestrator.tracking import ExperimentTracker
    from workers.expert_file import load_expert

    culture = load_expert(expert_file).meta.culture
    trial_id = f"{slug(culture)}-{val_alignment}"
    tracker = ExperimentTracker(config)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(expert_file, tmp)
        tracker.trial_finished(FinishedTrial(trial_id, Path(tmp)))
        return asdict(tracker.register(Winner(culture, trial_id, Path(tmp), val_alignment)))


BREAKING_PROMPT = "this prompt ends the engine thread"


def breakable_pool(settings, **options):
    """An ExpertPool deployment, without a router, whose engine thread dies at the first decode step of
    BREAKING_PROMPT (its fault hook raises what no step catches): a replica with a broken engine.

    Returns the Application; `options` are Serve's deployment options (health_check_period_s, ...)."""
    from ray import serve

    from serve.pool import ExpertPool

    class EngineKilled(BaseException):
        """Not an Exception: no step contains it, and the engine thread ends."""

    class BreakablePool(ExpertPool.func_or_class):
        def __init__(self, settings):
            super().__init__(settings)
            breaking = self.base.tokenizer(BREAKING_PROMPT, add_special_tokens=False)["input_ids"]

            def kill(generation, at: str) -> None:
                if at == "decode" and generation.request.prompt_ids == breaking:
                    raise EngineKilled()

            self.engine.fault_hook = kill

    return serve.deployment(BreakablePool).options(**options).bind(settings)
