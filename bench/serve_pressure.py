"""Pressure on a running server (`shores serve`): a long request beside short ones, and unknown-culture floods.

Run it against the demo's experts:

    .venv/bin/shores serve --config configs/demo.yaml &
    python -m bench.serve_pressure --out runs/bench/serve_pressure.json

Three checks, printed as JSON (and written to --out):
  long      six short generations sent at once with one prompt of --long-tokens tokens and committee_size
            --committee: the statuses, and the long one's answer or refusal.
  burst     a good opinion request's latency alone, and sent at the start of a flood of --flood requests for
            cultures that do not exist (--rounds times each, medians and their ratio).
  sustained the same good request while floods follow each other without pause.
The flood comes from another process, over --connections kept-alive connections with requests encoded in
advance: an attacker's own CPU is not this client's, and the measured client shares no interpreter with it.
On one machine the flooder still takes CPU from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import psutil

from bench.common import machine, write_report
from bench.raw_http import RawConnection

QUESTION = {"question": "Do you think most people can be trusted?", "options": ["Yes", "No", "Don't know"]}
SHORT = ["Germany", "Japan", "Nigeria", "Brazil", "Mexico", "Kenya"]


async def flood_once(host: str, port: int, bodies: list[bytes], connections: int) -> list[int]:
    """Send every body (POST /v1/opinion) over `connections` connections; the statuses."""
    pending, statuses = list(bodies), []

    async def connection() -> None:
        raw = RawConnection(host, port)
        while pending:
            status, _ = await raw.post("/v1/opinion", pending.pop(), "application/json")
            statuses.append(status)
        raw.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


def flooder(url: str, count: int, connections: int, sustained: bool) -> None:
    """The flooding process: on each line read, one flood (or floods until stdin closes, `sustained`)."""
    parts = urlsplit(url)
    bodies = [json.dumps(QUESTION | {"culture": f"Atlantis {i}"}).encode() for i in range(count)]
    floods = statuses = 0
    refused: dict[int, int] = {}
    print("ready", flush=True)  # imports done: they take CPU the good requests measured alone would share
    for _ in iter(sys.stdin.readline, ""):  # a line: go
        started = time.perf_counter()
        while True:
            for status in asyncio.run(flood_once(parts.hostname, parts.port, bodies, connections)):
                refused[status] = refused.get(status, 0) + 1
            floods, statuses = floods + 1, statuses + count
            if not sustained or _stdin_ready():
                break
        if sustained:
            sys.stdin.readline()  # stop
        print(json.dumps({"seconds": time.perf_counter() - started, "floods": floods}), flush=True)
    print(json.dumps({"statuses": {str(k): v for k, v in sorted(refused.items())}, "requests": statuses}))


def _stdin_ready() -> bool:
    return bool(select.select([sys.stdin], [], [], 0)[0])


def good_latency(http: httpx.Client) -> float:
    started = time.perf_counter()
    response = http.post("/v1/opinion", json=QUESTION | {"culture": "Germany"})
    if response.status_code != 200:
        raise SystemExit(f"the good request got {response.status_code}: {response.text[:200]}")
    return time.perf_counter() - started


SERVER_PROCESSES = {  # Ray's process titles on this machine: the CPU a flood costs the server
    "proxy": "ray::ProxyActor",
    "router": "ray::ServeReplica:shores:Router",
    "pool": "ray::ServeReplica:shores:ExpertPool",
}


def server_cpu() -> dict[str, float]:
    """CPU seconds used so far by the server's processes on this machine, by role (pool replicas summed)."""
    used = dict.fromkeys(SERVER_PROCESSES, 0.0)
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        title = " ".join(process.info["cmdline"] or [])
        for role, prefix in SERVER_PROCESSES.items():
            if title.startswith(prefix) and process.info["cpu_times"] is not None:
                used[role] += process.info["cpu_times"].user + process.info["cpu_times"].system
    return used


def floods(args: argparse.Namespace, http: httpx.Client, sustained: bool) -> dict:
    """The good request alone, then with floods (one a round, or back to back), --rounds times."""
    command = [sys.executable, "-m", "bench.serve_pressure", "--url", args.url, "--flooder"]
    command += ["--flood", str(args.flood), "--connections", str(args.connections)]
    command += ["--sustained"] if sustained else []
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()  # ready
    alone, during, flood_seconds = [], [], []
    cpu = dict.fromkeys(SERVER_PROCESSES, 0.0)
    for _ in range(args.rounds):
        alone.append(statistics.median(good_latency(http) for _ in range(3)))
        before = server_cpu()
        process.stdin.write("go\n")
        process.stdin.flush()
        if sustained:
            time.sleep(0.2)  # floods under way
            during += [good_latency(http) for _ in range(3)]
            process.stdin.write("stop\n")
            process.stdin.flush()
        else:
            during.append(good_latency(http))
        flood_seconds.append(json.loads(process.stdout.readline())["seconds"])
        cpu = {role: cpu[role] + used - before[role] for role, used in server_cpu().items()}
    process.stdin.close()
    summary = json.loads(process.stdout.readline())
    process.wait()
    return {
        "good_alone_median_s": round(statistics.median(alone), 4),
        "good_during_median_s": round(statistics.median(during), 4),
        "good_during_max_s": round(max(during), 4),
        "ratio_median": round(statistics.median(during) / statistics.median(alone), 2),
        "flood_seconds_median": round(statistics.median(flood_seconds), 3),
        "flood_requests": summary["requests"],
        # The server's CPU while the floods ran (the good requests' own included), per flood request.
        "server_cpu_ms_per_flood_request": {
            role: round(1000 * seconds / summary["requests"], 3) for role, seconds in cpu.items()
        },
        "flood_statuses": summary["statuses"],
    }


def long_beside_short(args: argparse.Namespace, http: httpx.Client) -> dict:
    short = [
        {"prompt": f"What matters most in life? ({i})", "culture": c, "max_new_tokens": 16}
        for i, c in enumerate(SHORT)
    ]
    long = {
        "prompt": "yes " * args.long_tokens,
        "culture": "Canada",
        "committee_size": args.committee,
        "max_new_tokens": 16,
    }
    with ThreadPoolExecutor(len(short) + 1) as threads:
        started = time.perf_counter()
        answers = list(threads.map(lambda body: http.post("/v1/generate", json=body), [long, *short]))
    first, *rest = answers
    return {
        "short_statuses": [r.status_code for r in rest],
        "long_status": first.status_code,
        "long_answer": first.text[:300],
        "wall_s": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--flood", type=int, default=200, help="requests a flood")
    parser.add_argument("--connections", type=int, default=32, help="the flooder's connections")
    parser.add_argument("--rounds", type=int, default=10, help="good requests timed with a flood")
    parser.add_argument("--long-tokens", type=int, default=7000, help="the long prompt's words ('yes ')")
    parser.add_argument("--committee", type=int, default=8, help="the long request's committee_size")
    parser.add_argument("--out")
    parser.add_argument("--flooder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sustained", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flooder:
        return flooder(args.url, args.flood, args.connections, args.sustained)
    with httpx.Client(base_url=args.url, timeout=600) as http:
        for _ in range(3):  # first passes are slow everywhere
            good_latency(http)
        report = {
            "benchmark": "serve_pressure",
            "machine": machine(),
            "command": " ".join(["python", "-m", "bench.serve_pressure", *sys.argv[1:]]),
            "experts_version": http.get("/v1/experts").json()["experts_version"],
            "long": long_beside_short(args, http),
            "burst": floods(args, http, sustained=False),
            "sustained": floods(args, http, sustained=True),
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
