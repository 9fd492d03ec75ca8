"""Training throughput: K experts packed into one run vs K PEFT prompt-tuning runs one after another.

Both variants see the same examples in the same order with the same per-expert batch size b; packed
steps carry b rows of each of the K experts. Prints JSON: examples/s, peak memory above the loaded model,
and the ratio packed/sequential, for each model and K.

    python -m bench.train_throughput --models tiny smollm2-135m --ks 1 4 8 --out runs/bench/train.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from bench.common import DATA, PeakRSS, machine, model_path, write_report
from orchestrator.encoding import encode
from orchestrator.survey import load_survey, select_cultures, split_records
from workers.base_model import FrozenBase, load_frozen_base
from workers.prompts import SoftPromptBank
from workers.scoring import left_pad, option_log_probs, option_token_ids
from workers.trainer import PackedTrainer, TrainConfig, answer_loss, culture_seed


def packed(base: FrozenBase, examples: dict, b: int, lr: float, seed: int) -> float:
    """One packed run over every expert's examples; returns seconds."""
    bank = SoftPromptBank.initialise(base, list(examples), 8)
    trainer = PackedTrainer(base, bank, examples, {}, TrainConfig(batch_size=b, lr=lr, seed=seed))
    start = time.perf_counter()
    trainer.train_epoch()
    return time.perf_counter() - start


def sequential_peft(base: FrozenBase, examples: dict, b: int, lr: float, seed: int) -> float:
    """K PEFT prompt-tuning runs, one per expert, on the same examples in the same order; returns seconds."""
    letter_ids = option_token_ids(base.tokenizer).to(base.device)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8)
    total = 0.0
    for culture, rows in examples.items():
        model = get_peft_model(base.model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        order = torch.randperm(
            len(rows), generator=torch.Generator().manual_seed(culture_seed(seed, culture))
        )
        start = time.perf_counter()
        for step in range(0, len(rows), b):
            batch = [rows[i] for i in order[step : step + b].tolist()]
            ids, mask = left_pad([q.input_ids for q in batch], base.tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(base.device), attention_mask=mask.to(base.device)).logits[:, -1]
            n = torch.tensor([q.n_options for q in batch], device=base.device)
            log_probs = option_log_probs(logits, letter_ids, n, normalised=False)
            torch.stack([answer_loss(log_probs[i], q) for i, q in enumerate(batch)]).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += time.perf_counter() - start
        base.model = model.get_base_model()  # the next run starts from the plain frozen model again
    return total


def run(model: str, ks: list[int], b: int, steps: int, device: str, dtype: str) -> list[dict]:
    base = load_frozen_base(model_path(model), dtype, device)
    records, _ = load_survey(DATA)
    cultures = select_cultures(records, top=max(ks), min_questions=steps * b).trained
    train = split_records(records)["train"]
    pool = {c: encode(base, [r for r in train if r.culture == c][: steps * b], 320) for c in cultures}
    packed(base, {cultures[0]: pool[cultures[0]][:b]}, b, 1e-3, 0)  # warm-up, untimed
    results = []
    for k in ks:
        examples = {c: pool[c] for c in cultures[:k]}
        n = sum(len(v) for v in examples.values())
        with PeakRSS() as packed_mem:
            packed_s = packed(base, examples, b, 1e-3, 0)
        with PeakRSS() as seq_mem:
            seq_s = sequential_peft(base, examples, b, 1e-3, 0)
        row = {
            "model": model,
            "k": k,
            "batch_per_expert": b,
            "examples": n,
            "packed_examples_per_s": n / packed_s,
            "sequential_peft_examples_per_s": n / seq_s,
            "ratio_packed_over_sequential": seq_s / packed_s,
            "packed_peak_mb": packed_mem.mb,
            "sequential_peft_peak_mb": seq_mem.mb,
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=2, help="rows of each expert in one step (b)")
    parser.add_argument("--steps", type=int, default=3, help="steps of each expert")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    results = [
        row for m in args.models for row in run(m, args.ks, args.batch, args.steps, args.device, args.dtype)
    ]
    report = {"benchmark": "train_throughput", "machine": machine(), "dtype": args.dtype, "results": results}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
