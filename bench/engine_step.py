"""Per-step time of DecodeEngine.step(): this tree's engine beside the engine of another git revision.

The engine of `--baseline` (its workers/engine package, or workers/engine.py and workers/generation.py before
the package) is loaded from git as a second module, so both run in one process on the same model, bank and
requests, interleaved round by round (a shared machine's drift hits both alike). A round submits R requests at
once (serve_generate's workload: 16 experts of 4-32 virtual tokens, a third committees, greedy), prefills them,
and times the decode steps until all are done; `--new-tokens LO HI` draws each request's length, so rows retire
along the way (LO = HI: one steady batch). Prints JSON: mean ms a step of each, the ratio, whether every
request's tokens are identical in both, and the cache slots this tree's decode steps used and needed.

    python -m bench.engine_step --model smollm2-135m --baseline main --requests 24 --new-tokens 16 64
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, machine, model_path, write_report
from bench.serve_generate import expert_bank, workload
from workers.base_model import load_frozen_base
from workers.engine import DecodeEngine


def engine_at(revision: str) -> type:
    """DecodeEngine as it is at a git revision: its workers/engine package, loaded as `baseline_engine` (or, at
    a revision before the package, its workers/engine.py importing that revision's workers/generation.py)."""
    folder = Path(tempfile.mkdtemp(prefix="engine-"))
    sys.path.insert(0, str(folder))

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
        ).stdout

    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", revision, "workers/engine/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if listed:
        (folder / "baseline_engine").mkdir()
        for path in (p for p in listed if p.endswith(".py")):
            source = show(path).replace("workers.engine", "baseline_engine")
            (folder / "baseline_engine" / Path(path).name).write_text(source)
        return importlib.import_module("baseline_engine").DecodeEngine
    for name in ("generation", "engine"):
        source = show(f"workers/{name}.py").replace(
            "from workers.generation import", "from baseline_generation import"
        )
        (folder / f"baseline_{name}.py").write_text(source)
    for name in ("generation", "engine"):
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", folder / f"baseline_{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["baseline_engine"].DecodeEngine


def one_round(engine_class: type, base, bank, arrivals) -> tuple[float, int, list[list[int]], dict]:
    """Decode every request from a full start: seconds in decode steps, their number, the tokens, and the
    cache slots its decode steps used (rows x padded width) and needed (the rows' lengths), where counted."""
    engine = engine_class(base, bank, set(), max_rows=256)
    generations = [engine.submit(a.request) for a in arrivals]
    engine.step()  # every prefill (the step budget takes them all): not a decode step
    steps, start = 0, time.perf_counter()
    while engine.step():
        steps += 1
    slots = {
        "used": getattr(engine, "slot_steps_used", None),
        "needed": getattr(engine, "slot_steps_needed", None),
    }
    return time.perf_counter() - start, steps, [g.tokens for g in generations], slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m, or a model folder")
    parser.add_argument("--baseline", default="main", help="the git revision to compare with")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--new-tokens", nargs=2, type=int, default=[16, 64], metavar=("LO", "HI"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    base = load_frozen_base(model_path(args.model), "float32", device=args.device)
    bank = expert_bank(base, 0)
    arrivals = workload(base, args.requests, 1e6, 0, tuple(args.new_tokens))
    variants = {"baseline": engine_at(args.baseline), "this_tree": DecodeEngine}
    for engine_class in variants.values():  # first passes are slow everywhere: not measured
        one_round(engine_class, base, bank, arrivals[:2])
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list] = {}
    slots: dict[str, dict] = {}
    steps = 0
    for _ in range(args.rounds):
        for name, engine_class in variants.items():
            seconds, steps, tokens[name], slots[name] = one_round(engine_class, base, bank, arrivals)
            rounds[name].append(1000 * seconds / steps)
            print(f"{name}: {rounds[name][-1]:.2f} ms a step", file=sys.stderr, flush=True)
    mean = {name: float(np.mean(values)) for name, values in rounds.items()}
    report = {
        "benchmark": "engine_step",
        "machine": machine(),
        "device": str(base.device),
        "model": args.model,
        "baseline": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], capture_output=True, text=True
        ).stdout.strip(),
        "requests": args.requests,
        "rows": sum(len(a.request.members) for a in arrivals),
        "new_tokens": args.new_tokens,
        "decode_steps": steps,
        "ms_per_step": {name: round(value, 2) for name, value in mean.items()},
        "ms_per_step_rounds": {name: [round(v, 2) for v in values] for name, values in rounds.items()},
        "baseline_over_this_tree": round(mean["baseline"] / mean["this_tree"], 3),
        "same_tokens": tokens["baseline"] == tokens["this_tree"],
        # Summed over this tree's decode steps: the padding's share of the cache is 1 - needed / used.
        "cache_slot_steps": slots["this_tree"],
        "torch_threads": torch.get_num_threads(),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
