"""Generation in process: continuous batching (workers.engine) vs static batching (committee_generate).

The same workload goes through both, interleaved at each arrival rate: N decode requests over 16 experts
(prompts of 4, 8, 16 and 32 virtual tokens in one bank), a third of them committees of 2 or 3 experts,
`max_new_tokens` drawn from 8..256 (--max-new-tokens), greedy, no stop token (every request decodes its drawn length), arriving
as a Poisson process.
  static      a replica loop: take the waiting requests (up to --max-rows rows) and decode them as one batch
              to its longest request; every token of a request is out when its batch is done;
  continuous  the engine: requests join the running batch between decode steps and leave when done; each
              token is out when it is picked.
Both cap the batch at the same number of rows. Prints JSON (and writes --out): generated tokens/s, p50/p99
time to first token and end-to-end latency (from each request's arrival), the ratios continuous/static, the
share of requests whose tokens agree (greedy: they should all agree), and the machine.

    python -m bench.serve_generate --tiny --requests 16 --rates 8 --max-new-tokens 8 32   # a smoke test
    python -m bench.serve_generate --requests 64 --rates 0.5 1 2 --out runs/bench/generate.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, model_path, write_report
from tests.static_decoding import committee_generate
from workers.base_model import FrozenBase, load_frozen_base
from workers.chat import chat_prompt
from workers.engine import DecodeEngine, DecodeRequest
from workers.prompts import SoftPromptBank

EXPERTS = 16
PROMPT_LENGTHS = (4, 8, 16, 32)
TEXTS = [
    "Do you think most people can be trusted?",
    "How important is religion in your life?",
    "Is the economic situation in our country good or bad?",
    "What do you think about the role of women in politics?",
    "Should the government reduce the differences in income between rich and poor?",
    "How proud are you of your nationality?",
]


@dataclass
class Arrival:
    at: float  # seconds after the start
    request: DecodeRequest


def expert_bank(base: FrozenBase, seed: int) -> SoftPromptBank:
    """16 experts with random prompts of 4, 8, 16 and 32 virtual tokens, all in one bank."""
    generator = torch.Generator().manual_seed(seed)
    scale = base.model.get_input_embeddings().weight.float().std().item()
    prompts = [
        torch.randn(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)], base.hidden_size, generator=generator) * scale
        for i in range(EXPERTS)
    ]
    return SoftPromptBank([f"bench-{i:02d}" for i in range(EXPERTS)], prompts).to(base.device)


def workload(
    base: FrozenBase, n: int, rate: float, seed: int, new_tokens: tuple[int, int] = (8, 256)
) -> list[Arrival]:
    """n requests arriving as a Poisson process at `rate` a second; the same for a seed and rate."""
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1 / rate, n))
    arrivals = []
    for i in range(n):
        text = chat_prompt(base.tokenizer, [{"role": "user", "content": TEXTS[i % len(TEXTS)]}])
        ids = base.tokenizer.encode(text, add_special_tokens=False)
        size = int(rng.choice([1, 1, 2, 3]))  # a third of them committees
        experts = rng.choice(EXPERTS, size, replace=False)
        weights = rng.dirichlet(np.ones(size))
        members = [(int(e), float(w)) for e, w in zip(experts, weights)]
        arrivals.append(
            Arrival(
                float(at[i]), DecodeRequest(ids, members, int(rng.integers(new_tokens[0], new_tokens[1] + 1)))
            )
        )
    return arrivals


def run_static(base: FrozenBase, bank: SoftPromptBank, arrivals: list[Arrival], max_rows: int) -> dict:
    """A replica loop that decodes whatever has arrived as one static batch, then the next."""
    pending, queue = deque(range(len(arrivals))), deque()
    first, end, tokens = {}, {}, {}
    start = time.perf_counter()
    while pending or queue:
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]].at <= now:
            queue.append(pending.popleft())
        if not queue:
            time.sleep(arrivals[pending[0]].at - now)
            continue
        batch, rows = [], 0
        while queue and (not batch or rows + len(arrivals[queue[0]].request.members) <= max_rows):
            rows += len(arrivals[queue[0]].request.members)
            batch.append(queue.popleft())
        decoded = committee_generate(base, bank, [arrivals[i].request for i in batch], set())
        done = time.perf_counter() - start
        for i, result in zip(batch, decoded):
            first[i] = end[i] = done
            tokens[i] = result.token_ids
    return {"first": first, "end": end, "tokens": tokens}


def run_continuous(
    base: FrozenBase, bank: SoftPromptBank, arrivals: list[Arrival], max_rows: int, max_tokens_per_step: int
) -> dict:
    """The engine stepped in this thread: requests are submitted as they arrive, between steps."""
    engine = DecodeEngine(base, bank, set(), max_tokens_per_step=max_tokens_per_step, max_rows=max_rows)
    pending, generations = deque(range(len(arrivals))), {}
    first, end = {}, {}
    start = time.perf_counter()

    def listener(generation, token):
        now = time.perf_counter() - start
        if token is not None:
            first.setdefault(generation.id, now)
        else:
            end[generation.id] = now

    while pending or engine.has_work:
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]].at <= now:
            i = pending.popleft()
            generations[i] = engine.submit(arrivals[i].request, listener)
        if not engine.has_work:
            time.sleep(arrivals[pending[0]].at - now)
            continue
        engine.step()
    failed = [i for i, g in generations.items() if g.error is not None]
    if failed:
        raise RuntimeError(f"requests {failed} failed: {generations[failed[0]].error!r}")
    return {
        "first": {i: first[g.id] for i, g in generations.items()},
        "end": {i: end[g.id] for i, g in generations.items()},
        "tokens": {i: g.tokens for i, g in generations.items()},
    }


def summary(arrivals: list[Arrival], run: dict) -> dict:
    ttft = np.array([run["first"][i] - a.at for i, a in enumerate(arrivals)])
    e2e = np.array([run["end"][i] - a.at for i, a in enumerate(arrivals)])
    generated = sum(len(t) for t in run["tokens"].values())
    span = max(run["end"].values()) - arrivals[0].at
    return {
        "tokens_per_s": generated / span,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "e2e_p50_s": float(np.percentile(e2e, 50)),
        "e2e_p99_s": float(np.percentile(e2e, 99)),
        "generated_tokens": generated,
        "span_s": span,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or model folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama built here (a smoke test)")
    parser.add_argument("--requests", type=int, default=64, help="N requests per rate and variant")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.5, 1.0, 2.0], help="arrivals per second")
    parser.add_argument(
        "--max-new-tokens", nargs=2, type=int, default=[8, 256], metavar=("LO", "HI"), help="drawn uniformly"
    )
    parser.add_argument("--max-rows", type=int, default=32, help="the batch cap of both variants, in rows")
    parser.add_argument("--max-tokens-per-step", type=int, default=2048, help="the engine's step budget")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    name = model_path("tiny" if args.tiny else args.model)
    base = load_frozen_base(name, args.dtype, device=args.device)
    bank = expert_bank(base, args.seed)
    # First passes are slow everywhere: a few short requests through both, not measured.
    warm = workload(base, 4, 1000.0, args.seed + 1, (8, 8))
    run_static(base, bank, warm, args.max_rows)
    run_continuous(base, bank, warm, args.max_rows, args.max_tokens_per_step)

    results = []
    for rate in args.rates:
        arrivals = workload(base, args.requests, rate, args.seed, tuple(args.max_new_tokens))
        static = run_static(base, bank, arrivals, args.max_rows)
        print(f"rate {rate}/s static: {summary(arrivals, static)}", file=sys.stderr, flush=True)
        continuous = run_continuous(base, bank, arrivals, args.max_rows, args.max_tokens_per_step)
        print(f"rate {rate}/s continuous: {summary(arrivals, continuous)}", file=sys.stderr, flush=True)
        s, c = summary(arrivals, static), summary(arrivals, continuous)
        same = sum(static["tokens"][i] == continuous["tokens"][i] for i in range(len(arrivals)))
        results.append(
            {
                "rate_per_s": rate,
                "static": s,
                "continuous": c,
                "ratios": {
                    "throughput_continuous_over_static": c["tokens_per_s"] / s["tokens_per_s"],
                    **{
                        f"{key}_static_over_continuous": s[key] / c[key]
                        for key in ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s")
                    },
                },
                "same_tokens_share": same / len(arrivals),
            }
        )
    report = {
        "benchmark": "serve_generate",
        "machine": machine(),
        "device": str(base.device),
        "model": "tiny-llama (random)" if args.tiny else args.model,
        "dtype": args.dtype,
        "experts": EXPERTS,
        "prompt_lengths": list(PROMPT_LENGTHS),
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "max_rows": args.max_rows,
        "max_tokens_per_step": args.max_tokens_per_step,
        "static_first_token": "static batching returns a request's tokens when its batch is done",
        "results": results,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
