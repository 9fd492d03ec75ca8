"""A load test of the real Serve graph on 127.0.0.1: well-behaved clients alone and beside a hostile mix, then a
replica killed and a flood burst.

The graph is what `shores serve` runs (serve.app.build_app): a Router in front of two ExpertPool replicas, six
experts of prompt lengths 4 and 8 plus cultures answered by committees. C closed-loop clients send a mix of
opinion, generate, chat and streaming chat (`stream: true`, OpenAI's server-sent events) requests across
experts, survey-similarity committees and free-text profiles, each with a client deadline
(`serve.deployment.request_timeout_s` plus a margin). The run has three kinds of phase, each --duration
seconds:
  calm      the C clients alone;
  hostile   the C clients beside H hostile clients (in a process of their own, as an attacker's are),
            each looping over: a long prompt (3/4 of the context window, at most 7000 tokens) with the largest
            committee allowed, a flood of --unknown-flood requests for cultures that do not exist, and a
            `text/plain` post (a browser's simple request);
            in the first hostile phase a new expert is published and the first replica to reload it fails
            once (the pool's $SHORES_RELOAD_FAULT hook, removed once /v1/status shows the failure);
  faults    the C clients; at 1/3 one ExpertPool replica is killed (`ray.kill`, found with
            ray.util.list_named_actors): Serve replaces it, requests it held are answered 503 (never
            replayed); at 2/3 a flood of --burst requests past the pool's `max_queued_requests`: refused at once
            with 503 + Retry-After, while the clients' requests keep being answered.
Calm and hostile phases alternate --rounds times, so both see the same machine. Prints JSON (and writes --out):
side by side, the well-behaved clients' goodput (answers 200 a second) and p99 latency in calm and hostile
phases and their ratios, with every phase's 5xx by status and the hostile requests' statuses; the reload's
events; each phase's last /v1/status counters of a pool replica (whatever the engine reports); counts by
status code per endpoint and per window, latency percentiles, the 5xx outside the kill and burst windows, and
whether every request was answered or refused within its deadline. Streaming chat answered 400 (a server
without streaming) is counted apart.

    python -m bench.serve_load --out runs/bench/serve_load.json      # 32 clients, 8 hostile, 3 x 30 s
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import torch

from bench.common import DATA, free_port, machine, model_path, write_report
from bench.raw_http import RawConnection
from orchestrator.config import ExperimentConfig
from serve.edge import EDGE_ENV, EDGE_IMPORT_PATH
from serve.expert_set import RELOAD_FAULT_ENV
from workers.base_model import load_frozen_base
from workers.cultures import slug
from workers.expert_file import Expert, ExpertMeta, save_expert
from workers.expert_store import SIMILARITY_FILE
from workers.prompts import persona_text

EXPERTS = {"Germany": 4, "Japan": 8, "Kenya": 4, "India": 8, "Mexico": 4, "Sweden": 8}  # prompt lengths
HELD_OUT = ["Canada", "Brazil"]  # no expert: committees of their nearest experts
RELOADED = "Peru"  # published during the first hostile phase: its reload fails once on one replica
LONG_WORD = "yes "  # a long prompt repeats it
QUESTION = {"question": "Do you think most people can be trusted?", "options": ["Yes", "No", "Don't know"]}
CHAT = "/v1/chat/completions"
PROFILES = ["I am a teacher in Osaka.", "A farmer near Nairobi, three children.", "Student in Stockholm"]


def write_experts(model: str, directory: Path, staged: Path) -> int:
    """Random-prompt experts of lengths 4 and 8, a survey-similarity table that covers the held-out, and one more
    expert (RELOADED) in `staged`, published during the run; the words of a long prompt (LONG_WORD repeated to
    3/4 of the model's context window, at most 7000 tokens)."""
    base = load_frozen_base(model, "float32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    scale = base.model.get_input_embeddings().weight.float().std().item()
    for culture, length in [*EXPERTS.items(), (RELOADED, 4)]:
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
        folder = staged if culture == RELOADED else directory
        save_expert(folder / f"{slug(culture)}.safetensors", Expert(prompt, meta))
    rng = np.random.default_rng(0)
    similarity = {
        c: {e: round(float(rng.uniform(0.3, 0.9)), 3) for e in EXPERTS if e != c}
        for c in [*EXPERTS, *HELD_OUT]
    }
    (directory / SIMILARITY_FILE).write_text(json.dumps(similarity))
    tokens = min(3 * base.model.config.max_position_embeddings // 4, 7000)
    per_word = len(base.tokenizer(LONG_WORD * 100, add_special_tokens=False)["input_ids"]) / 100
    return int(tokens / per_word)


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


def hostile_mix(long_words: int, committee: int, flood: int) -> list[tuple[str, str, dict | str]]:
    """(kind, path, body) of one hostile client's loop: a long prompt with the largest committee, a flood of
    unknown cultures, a `text/plain` post (a string body)."""
    long = {
        "prompt": LONG_WORD * long_words,
        "culture": HELD_OUT[0],
        "committee_size": committee,
        "max_new_tokens": 8,
    }
    unknown = [("unknown", "/v1/opinion", QUESTION | {"culture": f"Atlantis {i}"}) for i in range(flood)]
    plain = ("text_plain", "/v1/opinion", json.dumps(QUESTION | {"culture": "Germany"}))
    return [("long_prompt", "/v1/generate", long), *unknown, plain]


@dataclass
class Outcome:
    kind: str
    # 0: no answer within the client's deadline (or the connection failed); -1: a malformed answer. A stream
    # whose error came as its last event (its 200 was sent already) has that error's code.
    status: int
    start: float  # seconds since the run began
    end: float
    phase: str = ""  # calm, hostile or faults
    hostile: bool = False  # sent by a hostile client
    burst: bool = False
    error: str = ""
    chunks: int = 0  # streaming: server-sent events received
    mid_stream: bool = False  # the error came inside a started stream


async def send(
    client: httpx.AsyncClient,
    t0: float,
    kind: str,
    path: str,
    body: dict | str,
    phase: str,
    hostile: bool = False,
    burst: bool = False,
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
            if isinstance(body, str):  # a browser's simple request: no preflight, and no JSON content type
                response = await client.post(path, content=body, headers={"content-type": "text/plain"})
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
    end = time.perf_counter() - t0
    return Outcome(kind, status, start, end, phase, hostile, burst, error[:120], chunks, mid_stream)


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


@dataclass
class Setup:
    """What the phases need besides the arguments: the server, the client deadline, the reload's files."""

    url: str
    deadline: float
    long_words: int  # the long prompts' length
    experts: Path  # the directory the replicas read
    staged: Path  # the expert published in the first hostile phase
    fault: Path  # $SHORES_RELOAD_FAULT


async def run(args: argparse.Namespace, setup: Setup) -> tuple[list[Outcome], dict, dict]:
    """Every phase in turn: (outcomes, events, each phase's seconds and last pool status)."""
    import ray

    mix = request_mix(args.max_tokens)
    outcomes: list[Outcome] = []
    events: dict = {}
    phases: dict = defaultdict(lambda: {"seconds": 0.0})
    connections = args.clients + args.burst + 8
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=setup.url, timeout=setup.deadline, limits=limits) as client:
        t0 = time.perf_counter()

        def now() -> float:
            return round(time.perf_counter() - t0, 2)

        async def pool_state() -> dict | None:
            """One pool replica's counters from /v1/status (None while the server cannot answer)."""
            response = await client.get("/v1/status")
            return response.json()["pool"] if response.status_code == 200 else None

        async def well_behaved(phase: str, stop: float) -> None:
            async def one(c: int) -> None:
                i = c
                while time.perf_counter() < stop:
                    outcomes.append(await send(client, t0, *mix[i % len(mix)], phase=phase))
                    i += args.clients  # clients walk the mix in step, so every kind is in flight at once

            await asyncio.gather(*(one(c) for c in range(args.clients)))

        async def hostile_clients(stop: float) -> None:
            began = time.perf_counter() - t0
            worker.stdin.write(f"{stop - time.perf_counter()}\n".encode())
            await worker.stdin.drain()
            while (line := (await worker.stdout.readline()).decode().strip()) != "end":
                o = Outcome(**json.loads(line))  # times from the worker's go: moved to this run's clock
                outcomes.append(replace(o, start=o.start + began, end=o.end + began))

        async def failing_reload(give_up: float) -> None:
            """Publish an expert; the first replica to reload it fails until /v1/status shows the failure."""
            old = (await pool_state())["experts_version"]
            setup.fault.touch()
            os.replace(setup.staged, setup.experts / setup.staged.name)
            events["reload_published_s"] = now()
            while time.perf_counter() < give_up:
                state = await pool_state()
                if state and state["reload_failures"]:
                    events["reload_failed_s"] = now()
                    break
                await asyncio.sleep(0.2)
            setup.fault.unlink(missing_ok=True)  # the failing replica's next retry loads it
            served: dict[str, dict] = {}
            while time.perf_counter() < give_up:
                if state := await pool_state():
                    served[state["replica"]] = state
                if len(served) == 2 and all(
                    s["experts_version"] != old and s["reload_pending"] is None for s in served.values()
                ):
                    events["reload_converged_s"] = now()
                    events["reload_failures"] = sum(s["reload_failures"] for s in served.values())
                    return
                await asyncio.sleep(0.2)

        async def phase(name: str, *extra) -> None:
            start = time.perf_counter()
            stop = start + args.duration

            async def timed() -> None:  # goodput's seconds: while the well-behaved clients send
                await well_behaved(name, stop)
                phases[name]["seconds"] += time.perf_counter() - start

            await asyncio.gather(timed(), *(task(stop) for task in extra))
            # The counters, and the engine's cache slots (budget, used and needed, summed over steps).
            phases[name]["pool_status"] = {
                k: v
                for k, v in ((await pool_state()) or {}).items()
                if isinstance(v, (int, float, str)) or k == "cache"
            }

        async def kill_one(stop: float) -> None:
            await asyncio.sleep(args.duration / 3)
            before = await asyncio.to_thread(pool_replicas)
            victim = before[0]
            events["killed_replica"] = victim["name"]
            events["killed_at_s"] = time.perf_counter() - t0
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            # Serve notices the dead actor and starts a replacement (a new name); the run goes on regardless
            # and waits for it at the end, up to a client deadline (a smoke run does not wait).
            while time.perf_counter() < stop + (0 if args.tiny else setup.deadline):
                await asyncio.sleep(0.5)
                new = {a["name"] for a in await asyncio.to_thread(pool_replicas)} - {
                    a["name"] for a in before
                }
                if new and await asyncio.to_thread(running_pool_replicas) >= len(before):
                    events["replaced_at_s"] = time.perf_counter() - t0
                    return

        async def flood(stop: float) -> None:
            await asyncio.sleep(2 * args.duration / 3)
            events["burst_at_s"] = time.perf_counter() - t0
            kind, path, body = mix[0]
            sent = [send(client, t0, kind, path, body, "faults", burst=True) for _ in range(args.burst)]
            outcomes.extend(await asyncio.gather(*sent))
            events["burst_done_s"] = time.perf_counter() - t0

        # The hostile clients run in another process, as an attacker's do: their event loop and interpreter are
        # not the clients'. It starts (imports, connects) before the first phase, then waits for each go.
        command = [sys.executable, "-m", "bench.serve_load", "--hostile-worker", setup.url]
        command += ["--worker-words", str(setup.long_words), "--hostile-clients", str(args.hostile_clients)]
        command += [
            "--unknown-flood",
            str(args.unknown_flood),
            "--hostile-committee",
            str(args.hostile_committee),
        ]
        command += ["--request-timeout", str(args.request_timeout)]
        worker = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        await worker.stdout.readline()  # ready
        for round_ in range(args.rounds):
            await phase("calm")
            reload = [lambda stop: failing_reload(stop + setup.deadline)] if round_ == 0 else []
            await phase("hostile", hostile_clients, *reload)
        used = psutil.Process(worker.pid).cpu_times()
        events["hostile_worker_cpu_s"] = round(used.user + used.system, 1)  # the attacker's own CPU, here
        worker.stdin.close()
        await worker.wait()
        await phase("faults", kill_one, flood)
        events["wall_s"] = time.perf_counter() - t0
    return outcomes, events, dict(phases)


async def hostile_worker(args: argparse.Namespace) -> None:
    """The hostile clients' process: for each line read (seconds), loops of hostile_mix that long, then each
    outcome as a JSON line and `end`. Its requests go over plain sockets: an attacker's client costs little
    CPU, and on this one machine its CPU is the server's."""
    hostile = hostile_mix(args.worker_words, args.hostile_committee, args.unknown_flood)
    parts = urlsplit(args.hostile_worker)
    deadline = args.request_timeout + 15
    print("ready", flush=True)
    while seconds := await asyncio.to_thread(sys.stdin.readline):
        outcomes: list[Outcome] = []
        t0 = time.perf_counter()
        stop = t0 + float(seconds)
        loops = [
            hostile_loop(parts.hostname, parts.port, deadline, t0, stop, hostile, outcomes)
            for _ in range(args.hostile_clients)
        ]
        await asyncio.gather(*loops)
        print("\n".join([*(json.dumps(asdict(o)) for o in outcomes), "end"]), flush=True)


async def hostile_loop(
    host: str, port: int, deadline: float, t0: float, stop: float, hostile: list, outcomes: list
) -> None:
    """One hostile client until `stop`: the long prompt, the flood all at once (a connection each), the
    `text/plain` post; again."""
    long, *unknown, plain = hostile
    connections = [RawConnection(host, port) for _ in range(max(1, len(unknown)))]

    async def one(connection: RawConnection, kind: str, path: str, body: dict | str) -> Outcome:
        start = time.perf_counter() - t0
        content_type = "text/plain" if isinstance(body, str) else "application/json"
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            status, answer = await asyncio.wait_for(connection.post(path, data, content_type), deadline)
            error = "" if status == 200 else answer.decode(errors="replace")[:120]
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as err:
            status, error = 0, f"{type(err).__name__}: {err}"
            connection.close()  # a fresh connection for the next request
        return Outcome(kind, status, start, time.perf_counter() - t0, "hostile", True, error=error)

    while time.perf_counter() < stop:
        outcomes.append(await one(connections[0], *long))
        outcomes.extend(await asyncio.gather(*(one(c, *u) for c, u in zip(connections, unknown))))
        outcomes.append(await one(connections[0], *plain))
    for connection in connections:
        connection.close()


def window(outcome: Outcome, events: dict) -> str:
    """Which window a request was in: its phase (calm, hostile), or in the faults phase burst (it was one, or ran
    during it), kill, else steady."""

    def overlaps(a: str, b: str) -> bool:
        return a in events and outcome.start <= events.get(b, float("inf")) and outcome.end >= events[a]

    if outcome.phase != "faults":
        return outcome.phase
    if outcome.burst or overlaps("burst_at_s", "burst_done_s"):
        return "burst"
    return "kill" if overlaps("killed_at_s", "replaced_at_s") else "steady"


def side_by_side(outcomes: list[Outcome], phases: dict) -> dict:
    """The well-behaved clients' goodput and p99 latency without (calm) and with (hostile) the hostile mix,
    the ratios, and each phase's 5xx by status; the hostile requests' statuses by kind."""

    def figures(phase: str) -> dict:
        ours = [o for o in outcomes if o.phase == phase]
        good = [o for o in ours if not o.hostile]
        answered = [o.end - o.start for o in good if o.status == 200]
        seconds = phases[phase]["seconds"]
        hostile: dict = defaultdict(Counter)
        for o in ours:
            if o.hostile:
                hostile[o.kind][str(o.status)] += 1
        return {
            "seconds": round(seconds, 1),
            "well_behaved_requests": len(good),
            "well_behaved_goodput_rps": round(len(answered) / seconds, 2),
            "well_behaved_p50_s": round(float(np.percentile(answered, 50)), 3) if answered else None,
            "well_behaved_p99_s": round(float(np.percentile(answered, 99)), 3) if answered else None,
            "well_behaved_5xx_by_status": dict(Counter(str(o.status) for o in good if o.status >= 500)),
            "hostile_5xx_by_status": dict(
                Counter(str(o.status) for o in ours if o.hostile and o.status >= 500)
            ),
            "hostile_status_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(hostile.items())},
            "pool_status": phases[phase].get("pool_status", {}),
        }

    calm, hostile = figures("calm"), figures("hostile")

    def ratio(key: str) -> float | None:
        return round(hostile[key] / calm[key], 3) if calm[key] and hostile[key] is not None else None

    return {
        "calm": calm,
        "hostile": hostile,
        "goodput_ratio_hostile_to_calm": ratio("well_behaved_goodput_rps"),
        "p99_ratio_hostile_to_calm": ratio("well_behaved_p99_s"),
    }


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
        by_kind[("burst_" if o.burst else "hostile_" if o.hostile else "") + o.kind][key] += 1
        by_window[window(o, events)][key] += 1
        if o.status == 503:
            refusals[o.error] += (
                1  # overload (JSON from the router, or the proxy's plain text) or a dead replica
            )
        if o.status == 200 and not o.hostile:
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
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run: 4 clients, 2 hostile, 6 s a phase, a small burst"
    )
    parser.add_argument("--clients", type=int, default=32, help="well-behaved clients")
    parser.add_argument("--hostile-clients", type=int, default=8, help="hostile clients in hostile phases")
    parser.add_argument(
        "--unknown-flood", type=int, default=50, help="unknown cultures a hostile client floods"
    )
    parser.add_argument("--hostile-committee", type=int, default=8, help="committee_size of the long prompts")
    parser.add_argument("--rounds", type=int, default=1, help="calm and hostile phases, alternated")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds a phase")
    parser.add_argument("--burst", type=int, default=600, help="requests in the flood, all at once")
    parser.add_argument(
        "--max-queued", type=int, default=64, help="serve.deployment.max_queued_requests of the pool"
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens of generate and chat requests")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="serve.deployment.request_timeout_s"
    )
    parser.add_argument(
        "--edge-refusals-per-s",
        type=float,
        default=50,
        help="serve.limits.edge_refusals_per_s (0: no limit); "
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH= runs without the edge",
    )
    parser.add_argument("--out", type=Path)
    # The hostile clients' process (see hostile_worker).
    parser.add_argument("--hostile-worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--worker-words", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hostile_worker:
        return asyncio.run(hostile_worker(args))
    if args.tiny:
        args.model, args.clients, args.duration, args.burst, args.max_queued = "tiny", 4, 6.0, 200, 8
        args.hostile_clients, args.unknown_flood = 2, 20
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault(
        "RAY_worker_niceness", "0"
    )  # as in serve_throughput: replicas not starved by neighbours
    # As `shores serve`: the proxy refuses what it can judge (serve/edge.py).
    os.environ.setdefault(EDGE_ENV, EDGE_IMPORT_PATH)

    import ray
    from ray import serve

    from serve.app import build_app

    folder = model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    (work / "staged").mkdir()
    long_words = write_experts(folder, work / "experts", work / "staged")
    fault = work / "reload-fault"
    os.environ[RELOAD_FAULT_ENV] = str(fault)  # before Ray starts: the replicas inherit it
    config = ExperimentConfig.model_validate(
        {
            "name": "serve-load",
            "output_dir": str(work),
            "base_model": {"name": folder, "device": "cpu"},
            "data": {"path": str(DATA), "cultures": list(EXPERTS), "max_length": 256},
            "serve": {
                "deployment": {
                    "num_replicas": 2,
                    "cpus_per_replica": 1,
                    "max_queued_requests": args.max_queued,
                    "request_timeout_s": args.request_timeout,
                    "reload_interval_s": 1,
                },
                "limits": {
                    "max_batch_size": 32,  # rows in a replica's running batch
                    "max_committee_size": args.hostile_committee,
                    "edge_refusals_per_s": args.edge_refusals_per_s,
                },
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
        staged = work / "staged" / f"{slug(RELOADED)}.safetensors"
        setup = Setup(url, deadline, long_words, work / "experts", staged, fault)
        outcomes, events, phases = asyncio.run(run(args, setup))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_load",
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": "tiny-llama (random)" if args.model == "tiny" else args.model,
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"pool_replicas": 2, "max_batch_rows": 32, "long_prompt_words": long_words},
        "startup_s": round(startup, 1),
        "side_by_side": side_by_side(outcomes, phases),
        **report(outcomes, events, deadline),
    }
    write_report(result, args.out)


async def warm_up(url: str, mix: list) -> None:
    """One request of each kind, one at a time, before the clock starts: first passes are slow everywhere."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for entry in {kind: (kind, path, body) for kind, path, body in mix}.values():
            await send(client, time.perf_counter(), *entry, phase="warm-up")


if __name__ == "__main__":
    main()
