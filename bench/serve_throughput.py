"""Serving throughput over HTTP: batches that mix experts vs batches of one expert each vs the base model.

The same stream of N opinion requests (request i asks expert i mod E; the same survey questions in the same
order) goes through the real Serve graph on 127.0.0.1 from C concurrent clients, with the same maximum batch
size, in three variants, interleaved in one run:
  mixed       ExpertPool batches requests for any experts into one forward pass (shores' pool);
  per_expert  the pool groups each batch by expert and runs one forward pass per expert: what batching by
              model id (Serve's multiplexing) amounts to;
  base        the same requests with no prompt (culture `base`) through the mixed pool.
E experts with random prompts on the same base. Prints JSON (and writes --out): requests/s, p50/p99 latency,
mean batch size, the ratios mixed/per_expert and mixed/base, and the machine.

    python -m bench.serve_throughput --models tiny smollm2-135m --experts 1 4 16 --out runs/bench/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.common import DATA, free_port, machine, model_path, write_report
from orchestrator.config import ExperimentConfig
from orchestrator.survey import load_survey
from workers.base_model import load_frozen_base
from workers.cultures import slug
from workers.expert_file import Expert, ExpertMeta, save_expert
from workers.expert_store import SIMILARITY_FILE
from workers.prompts import SoftPromptBank, persona_text

VARIANTS = ("mixed", "per_expert", "base")


def make_experts(model: str, dtype: str, count: int, directory: Path) -> list[str]:
    """`count` experts with random prompts on the base model (bench-00, bench-01, ...)."""
    base = load_frozen_base(model, dtype, device="cpu")
    names = [f"bench-{i:02d}" for i in range(count)]
    bank = SoftPromptBank.initialise(base, names, 8, init="random", seed=0)
    for i, name in enumerate(names):
        meta = ExpertMeta(
            name, "XX", 8, base.hidden_size, base.name, base.fingerprint, descriptor=persona_text(name)
        )
        save_expert(directory / f"{slug(name)}.safetensors", Expert(bank.prompts[i].detach(), meta))
    (directory / SIMILARITY_FILE).write_text("{}")
    return names


def questions(n: int) -> list[dict]:
    """n survey questions (the same ones for every variant), or synthetic ones without the shared data."""
    if DATA.exists():
        records, _ = load_survey(str(DATA))
        seen, out = set(), []
        for r in records:
            if r.question not in seen and 2 <= len(r.options) <= 6:
                seen.add(r.question)
                out.append({"question": r.question, "options": list(r.options)})
            if len(out) == n:
                return out
    return [
        {"question": f"Question {i}: is this a good idea?", "options": ["Yes", "No", "Unsure"]}
        for i in range(n)
    ]


async def stream(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body to POST url from `concurrency` clients; requests/s and latency percentiles."""
    latencies, failures, cursor = [], 0, iter(range(len(bodies)))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal failures
            for i in cursor:
                start = time.perf_counter()
                response = await client.post(url, json=bodies[i])
                latencies.append(time.perf_counter() - start)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "requests": len(bodies),
        "failures": failures,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 2),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
    }


def pool_counters(url: str) -> tuple[int, int]:
    pool = httpx.get(url + "/v1/status", timeout=60).json()["pool"]
    return pool["requests"], pool["batches"]


def run_model(name: str, args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from serve.app import build_app

    folder = model_path(name)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    experts = make_experts(folder, args.dtype, max(args.experts), work / "experts")
    cores = psutil.cpu_count()
    port = free_port()
    # Both pools get every core (torch threads follow a replica's CPUs); only one of them works at a time.
    ray.init(address="local", num_cpus=4 * cores, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = {}
    for variant in ("mixed", "per_expert"):
        config = ExperimentConfig.model_validate(
            {
                "name": "serve-bench",
                "output_dir": str(work),
                "base_model": {"name": folder, "dtype": args.dtype, "device": "auto"},
                "data": {"path": str(DATA), "cultures": experts[:1], "max_length": 256},
                "serve": {
                    "deployment": {"batching": variant, "cpus_per_replica": cores, "reload_interval_s": 0},
                    "limits": {"max_batch_size": args.max_batch_size},
                },
            }
        )
        serve.run(build_app(config), name=variant, route_prefix=f"/{variant}")
        apps[variant] = f"http://127.0.0.1:{port}/{variant}"
    apps["base"] = apps["mixed"]
    stream_questions = questions(args.requests)
    results: dict = {}
    try:
        for url in set(apps.values()):  # the first forward passes are slow everywhere: not measured
            asyncio.run(
                stream(url + "/v1/opinion", [q | {"culture": experts[0]} for q in stream_questions[:8]], 4)
            )
        for e in args.experts:
            row: dict = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:  # interleaved, so drift on a shared machine hits every variant alike
                    cultures = ["base"] * len(stream_questions) if variant == "base" else experts
                    bodies = [q | {"culture": cultures[i % e]} for i, q in enumerate(stream_questions)]
                    before = pool_counters(apps[variant])
                    measured = asyncio.run(stream(apps[variant] + "/v1/opinion", bodies, args.concurrency))
                    after = pool_counters(apps[variant])
                    measured["mean_batch"] = round((after[0] - before[0]) / max(1, after[1] - before[1]), 2)
                    row[variant].append(measured)
                    print(f"{name} E={e} {variant}: {measured}", file=sys.stderr, flush=True)
            summary = {v: _pooled(runs) for v, runs in row.items()}
            summary["ratios"] = {
                "mixed/per_expert": round(
                    summary["mixed"]["requests_per_s"] / summary["per_expert"]["requests_per_s"], 3
                ),
                "mixed/base": round(
                    summary["mixed"]["requests_per_s"] / summary["base"]["requests_per_s"], 3
                ),
            }
            results[str(e)] = summary
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def _pooled(runs: list[dict]) -> dict:
    """Rounds of one variant together: total requests over total time; the median of the percentiles."""
    seconds = sum(r["seconds"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    return {
        "requests": requests,
        "failures": sum(r["failures"] for r in runs),
        "requests_per_s": round(requests / seconds, 2),
        "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
        "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
        "mean_batch": float(np.mean([r["mean_batch"] for r in runs])),
        "rounds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], help="tiny, smollm2-135m, or a model folder")
    parser.add_argument("--experts", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=96, help="N requests per variant and round")
    # Twice the batch size keeps a full batch waiting while one runs: closed-loop clients fewer than that
    # split into groups that never merge again (each group's replies come back while the other group runs).
    parser.add_argument("--concurrency", type=int, default=32, help="C concurrent clients")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray runs its workers at niceness 15: on a shared machine any other process would take their CPU in the
    # middle of a run. At 0 the replicas compete on equal terms, as the client and the driver do.
    os.environ.setdefault("RAY_worker_niceness", "0")
    report = {
        "benchmark": "serve_throughput",
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("models", "out")},
        "models": {name: run_model(name, args) for name in args.models},
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
