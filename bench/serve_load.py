"""A load test of the real Serve graph on 127.0.0.1: C clients for D seconds, a replica killed, a flood burst.

The graph is what `shores serve` runs (serve.app.build_app): a Router in front of two ExpertPool replicas, six
experts of prompt lengths 4 and 8 plus cultures answered by committees. C closed-loop clients send a mix of
opinion, generate, chat and streaming chat (`stream: true`, OpenAI's server-sent events) requests across
experts, survey-similarity committees and free-text profiles, each with a client deadline
(`serve.request_timeout_s` plus a margin). Meanwhile:
  at 1/3 of the run  one ExpertPool replica is killed (`ray.kill` on its actor, found with ray.util.state);
                     Serve replaces it; requests it held are answered 503 (never replayed);
  at 2/3 of the run  a flood of --burst requests at once, past the pool's `max_queued_requests`: refused
                     at once with 503 + Retry-After, while the clients' requests keep being answered.
Prints JSON (and writes --out): counts by status code per endpoint and per phase, latency percentiles of the
answered requests, the 5xx outside the kill and burst windows, and whether every request was answered or
refused within its deadline. Streaming chat answered 400 (a server without streaming) is counted apart.

    python -m bench.serve_load --out runs/bench/serve_load.json      # 32 clients, 60 s
    python -m bench.serve_load --tiny                                # a smoke run: seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

from bench.common import DATA, free_port, machine, model_path, write_report
from orchestrator.config import ExperimentConfig
from workers.base_model import load_frozen_base
from workers.cultures import slug
from workers.expert_store import SIMILARITY_FILE
from workers.prompts import Expert, ExpertMeta, persona_text, save_expert

EXPERTS = {"Germany": 4, "Japan": 8, "Kenya": 4, "India": 8, "Mexico": 4, "Sweden": 8}  # prompt lengths
HELD_OUT = ["Canada", "Brazil"]  # no expert: committees of their nearest experts
QUESTION = {"question": "Do you think most people can be trusted?", "options": ["Yes", "No", "Don't know"]}
CHAT = "/v1/chat/completions"
PROFILES = ["I am a teacher in Osaka.", "A farmer near Nairobi, three children.", "Student in Stockholm"]


def write_experts(model: str, directory: Path) -> None:
    """Random-prompt experts of lengths 4 and 8, and a survey-similarity table that covers the held-out."""
    base = load_frozen_base(model, "float32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    scale = base.model.get_input_embeddings().weight.float().std().item()
    for culture, length in EXPERTS.items():
        meta = ExpertMeta(
            culture,
            culture[:2].upper(),
            length,
            base.hidden_size,
            base.name,
            base.fingerprint,
            descriptor=persona_text(culture),
        )
        prompt = torch.randn(length, base.hidden_size, generator=generator) * scale
        save_expert(directory / f"{slug(culture)}.safetensors", Expert(prompt, meta))
    rng = np.random.default_rng(0)
    similarity = {
        c: {e: round(float(rng.uniform(0.3, 0.9)), 3) for e in EXPERTS if e != c}
        for c in [*EXPERTS, *HELD_OUT]
    }
    (directory / SIMILARITY_FILE).write_text(json.dumps(similarity))


def request_mix(max_tokens: int) -> list[tuple[str, str, dict]]:
    """(kind, path, body): opinion, generate, chat and streaming chat over experts, committees and profiles."""

    def chat(model: str, messages: list[dict], stream: bool) -> tuple[str, str, dict]:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens}
        return ("chat_stream", CHAT, body | {"stream": True}) if stream else ("chat", CHAT, body)

    mix = [("opinion", "/v1/opinion", QUESTION | {"culture": "base"})]
    for i, culture in enumerate([*EXPERTS, *HELD_OUT]):  # held-out cultures: similarity committees
        mix.append(("opinion", "/v1/opinion", QUESTION | {"culture": culture}))
        user = [{"role": "user", "content": "What matters most in a good life?"}]
        mix.append(chat(f"shores:{slug(culture)}", user, stream=bool(i % 2)))
        if i % 2:
            body = {"prompt": "Family is", "culture": culture, "max_new_tokens": max_tokens}
            mix.append(("generate", "/v1/generate", body))
    for profile in PROFILES:  # free text: committees from sentence embeddings
        mix.append(("opinion", "/v1/opinion", QUESTION | {"profile": profile}))
        mix.append(
            (
                "generate",
                "/v1/generate",
                {"prompt": "Work is", "profile": profile, "max_new_tokens": max_tokens},
            )
        )
        system = [{"role": "system", "content": profile}, {"role": "user", "content": "Is work important?"}]
        mix += [chat("shores:auto", system, stream=False), chat("shores:auto", system, stream=True)]
    return mix


@dataclass
class Outcome:
    kind: str
    # 0: no answer within the client's deadline (or the connection failed); -1: a malformed answer. A stream
    # whose error came as its last event (its 200 was sent already) has that error's code.
    status: int
    start: float  # seconds since the run began
    end: float
    burst: bool = False
    error: str = ""
    chunks: int = 0  # streaming: server-sent events received
    mid_stream: bool = False  # the error came inside a started stream


async def send(
    client: httpx.AsyncClient, t0: float, kind: str, path: str, body: dict, burst: bool = False
) -> Outcome:
    start = time.perf_counter() - t0
    status, error, chunks, mid_stream = 0, "", 0, False
    try:
        if kind == "chat_stream":
            async with client.stream("POST", path, json=body) as response:
                status = response.status_code
                if status == 200:
                    status, error, chunks, mid_stream = await read_events(response)
                else:
                    error = (await response.aread()).decode(errors="replace")
        else:
            response = await client.post(path, json=body)
            status = response.status_code
            if status == 200:
                answer = response.json()
                if kind == "opinion" and abs(sum(answer["distribution"]) - 1) > 1e-4:
                    status, error = -1, "distribution does not sum to 1"
            else:
                error = response.text
    except httpx.HTTPError as err:  # a timeout past the deadline, or a refused connection
        error = f"{type(err).__name__}: {err}"
    return Outcome(kind, status, start, time.perf_counter() - t0, burst, error[:120], chunks, mid_stream)


async def read_events(response: httpx.Response) -> tuple[int, str, int, bool]:
    """Read a stream to its end: (status, error, events, whether the error came as an event mid-stream)."""
    chunks, done = 0, False
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])  # every event is one JSON object
            chunks += 1
            if "error" in event:  # the 200 went out with the first event: a later error is an event
                return event["error"]["code"], event["error"]["message"], chunks, True
    return (200, "", chunks, False) if done else (-1, "the stream ended without [DONE]", chunks, False)


def pool_replicas() -> list[dict]:
    """The live ExpertPool replica actors, by the names Serve gives them (SERVE_REPLICA::<app>#<deployment>#<id>).

    Named actors come from Ray's control store, so this needs no dashboard (ray.util.state's API does).
    """
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "#ExpertPool#" in a["name"]]


def running_pool_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["shores"].deployments["ExpertPool"]
    return deployment.replica_states.get("RUNNING", 0)


async def run(url: str, args: argparse.Namespace, deadline: float) -> tuple[list[Outcome], dict]:
    import ray

    mix = request_mix(args.max_tokens)
    outcomes: list[Outcome] = []
    events: dict = {}
    limits = httpx.Limits(max_connections=args.clients + args.burst + 8)
    async with httpx.AsyncClient(base_url=url, timeout=deadline, limits=limits) as client:
        t0 = time.perf_counter()
        stop = t0 + args.duration

        async def one_client(c: int) -> None:
            i = c
            while time.perf_counter() < stop:
                outcomes.append(await send(client, t0, *mix[i % len(mix)]))
                i += args.clients  # clients walk the mix in step, so every kind is in flight at once

        async def kill_one() -> None:
            await asyncio.sleep(args.duration / 3)
            before = await asyncio.to_thread(pool_replicas)
            victim = before[0]
            events["killed_replica"] = victim["name"]
            events["killed_at_s"] = time.perf_counter() - t0
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            # Serve notices the dead actor and starts a replacement (a new name); the run goes on regardless
            # and waits for it at the end, up to a client deadline (a smoke run does not wait).
            while time.perf_counter() < stop + (0 if args.tiny else deadline):
                await asyncio.sleep(0.5)
                new = {a["name"] for a in await asyncio.to_thread(pool_replicas)} - {
                    a["name"] for a in before
                }
                if new and await asyncio.to_thread(running_pool_replicas) >= len(before):
                    events["replaced_at_s"] = time.perf_counter() - t0
                    return

        async def flood() -> None:
            await asyncio.sleep(2 * args.duration / 3)
            events["burst_at_s"] = time.perf_counter() - t0
            kind, path, body = mix[0]
            sent = [send(client, t0, kind, path, body, burst=True) for _ in range(args.burst)]
            outcomes.extend(await asyncio.gather(*sent))
            events["burst_done_s"] = time.perf_counter() - t0

        await asyncio.gather(*(one_client(c) for c in range(args.clients)), kill_one(), flood())
        events["wall_s"] = time.perf_counter() - t0
    return outcomes, events


def window(outcome: Outcome, events: dict) -> str:
    """Which window a request overlapped: burst (it was one, or ran during it), kill, else steady."""

    def overlaps(a: str, b: str) -> bool:
        return a in events and outcome.start <= events.get(b, float("inf")) and outcome.end >= events[a]

    if outcome.burst or overlaps("burst_at_s", "burst_done_s"):
        return "burst"
    return "kill" if overlaps("killed_at_s", "replaced_at_s") else "steady"


def report(outcomes: list[Outcome], events: dict, deadline: float) -> dict:
    by_kind: dict = defaultdict(Counter)
    by_window: dict = defaultdict(Counter)
    latencies: dict = defaultdict(list)
    refusals: Counter = Counter()
    for o in outcomes:
        key = str(o.status)
        if o.kind == "chat_stream" and o.status == 400 and "stream" in o.error:
            key = "400_stream_unsupported"  # a server without streaming
        elif o.mid_stream:
            key += "_mid_stream"
        by_kind[("burst_" if o.burst else "") + o.kind][key] += 1
        by_window[window(o, events)][key] += 1
        if o.status == 503:
            refusals[o.error] += (
                1  # overload (JSON from the router, or the proxy's plain text) or a dead replica
            )
        if o.status == 200:
            latencies[o.kind].append(o.end - o.start)
    # The goal: no 5xx but 503, and 503 only where it is the designed answer (the flood, the killed replica).
    unexpected = [
        {"kind": o.kind, "status": o.status, "window": window(o, events), "error": o.error}
        for o in outcomes
        if o.status >= 500 and (o.status != 503 or window(o, events) == "steady") or o.status < 0
    ]
    # httpx's timeout bounds each read, not the whole request: the deadline is checked on the clock too.
    unanswered = [o for o in outcomes if o.status == 0 or o.end - o.start > deadline]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 3)  # noqa: E731
    streams = [o.chunks for o in outcomes if o.kind == "chat_stream" and o.status == 200]
    return {
        "requests": len(outcomes),
        "answered_200": sum(o.status == 200 for o in outcomes),
        "status_by_endpoint": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "status_by_window": {k: dict(sorted(v.items())) for k, v in sorted(by_window.items())},
        "503_messages": dict(refusals.most_common()),
        "latency_s": {
            k: {"n": len(v), "p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "max": pct(v, 100)}
            for k, v in sorted(latencies.items())
        },
        "stream_chunks_mean": round(float(np.mean(streams)), 1) if streams else None,
        "events": {k: round(v, 2) if isinstance(v, float) else v for k, v in events.items()},
        "client_deadline_s": deadline,
        "every_request_answered_within_deadline": not unanswered,
        "unanswered": [{"kind": o.kind, "error": o.error} for o in unanswered][:10],
        "unexpected_5xx": unexpected[:20],
        "goal_no_5xx_but_503_in_burst_or_kill": not unexpected,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="tiny (a random Llama built here), smollm2-135m, or a folder"
    )
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4 clients, 9 s, a small burst")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the clients send for")
    parser.add_argument("--burst", type=int, default=600, help="requests in the flood, all at once")
    parser.add_argument("--max-queued", type=int, default=64, help="serve.max_queued_requests of the pool")
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens of generate and chat requests")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="serve.request_timeout_s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.tiny:
        args.model, args.clients, args.duration, args.burst, args.max_queued = "tiny", 4, 9.0, 200, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault(
        "RAY_worker_niceness", "0"
    )  # as in serve_throughput: replicas not starved by neighbours

    import ray
    from ray import serve

    from serve.app import build_app

    folder = model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    write_experts(folder, work / "experts")
    config = ExperimentConfig.model_validate(
        {
            "name": "serve-load",
            "output_dir": str(work),
            "base_model": {"name": folder, "device": "cpu"},
            "data": {"path": str(DATA), "cultures": list(EXPERTS), "max_length": 256},
            "serve": {
                "num_replicas": 2,
                "cpus_per_replica": 1,
                "max_batch_size": 32,  # rows in a replica's running batch
                "max_queued_requests": args.max_queued,
                "request_timeout_s": args.request_timeout,
                "reload_interval_s": 0,
            },
        }
    )
    deadline = args.request_timeout + 15  # the server's deadline, plus what routing and the proxy may add
    port = free_port()
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2 * psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="shores", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        startup = time.perf_counter() - started
        asyncio.run(warm_up(url, request_mix(args.max_tokens)))
        outcomes, events = asyncio.run(run(url, args, deadline))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_load",
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": "tiny-llama (random)" if args.model == "tiny" else args.model,
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"pool_replicas": 2, "max_batch_rows": 32},
        "startup_s": round(startup, 1),
        **report(outcomes, events, deadline),
    }
    write_report(result, args.out)


async def warm_up(url: str, mix: list) -> None:
    """One request of each kind, one at a time, before the clock starts: first passes are slow everywhere."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for entry in {kind: (kind, path, body) for kind, path, body in mix}.values():
            await send(client, time.perf_counter(), *entry)


if __name__ == "__main__":
    main()
