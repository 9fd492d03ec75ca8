"""Training throughput: K experts packed into one run vs K PEFT prompt-tuning runs one after another.

Both variants see the same examples in the same order with the same per-expert batch size b; packed
steps carry b rows of each of the K experts. Prints JSON: examples/s, peak memory above the loaded model,
and the ratio packed/sequential, for each model and K.

    python bench/train_throughput.py --models tiny smollm2-135m --ks 1 4 8 --out runs/bench/train.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.experiment import encode  # noqa: E402
from orchestrator.survey import load_survey, select_cultures, split_records  # noqa: E402
from workers.base_model import FrozenBase, load_frozen_base  # noqa: E402
from workers.prompts import SoftPromptBank  # noqa: E402
from workers.scoring import left_pad, option_log_probs, option_token_ids  # noqa: E402
from workers.trainer import PackedTrainer, TrainConfig, culture_seed, kl_to_survey  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "goqa" / "opinions.jsonl"


class PeakRSS:
    """Peak resident memory of this process above what it held on entry (after a trim), sampled every 5 ms."""

    def __enter__(self):
        # Hand memory freed by the previous variant back to the OS, so each variant starts level.
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.process, self.start, self.peak, self.done = psutil.Process(), 0, 0, False
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.mb = (self.peak - self.start) / 2**20


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return (
        f"{cpu or platform.processor()}, {psutil.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    )


def tiny_model_dir() -> str:
    """A tiny random Llama saved as a folder, the same kind the tests use."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import _save_tiny

    return str(_save_tiny("llama", Path(tempfile.mkdtemp()) / "tiny-llama"))


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
            log_probs = option_log_probs(logits, letter_ids, n)
            torch.stack([kl_to_survey(log_probs[i], q) for i, q in enumerate(batch)]).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += time.perf_counter() - start
        base.model = model.get_base_model()  # the next run starts from the plain frozen model again
    return total


def run(model: str, ks: list[int], b: int, steps: int, device: str, dtype: str) -> list[dict]:
    base = load_frozen_base(tiny_model_dir() if model == "tiny" else model, dtype, device)
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
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
