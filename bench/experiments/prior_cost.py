"""What the shared prior costs to train: one epoch over pooled survey questions, side by side.

Plain shuffled batches vs length-sorted runs (`train.length_buckets`), in float32 and bfloat16, on one base;
each setting trains the same questions from the same start, so the ratios are the figures to read.

    python -m bench.experiments.prior_cost --model smollm2-135m --questions 96 --out runs/bench/prior_cost.json
"""

from __future__ import annotations

import argparse
import time

from bench.common import DATA, machine, model_path, write_report
from orchestrator.config import DataSection, SharedSection
from orchestrator.encoding import encoded
from orchestrator.survey import prepare_data
from workers.base_model import load_frozen_base
from workers.cultures import SHARED
from workers.prompts import SoftPromptBank
from workers.settings import TrainConfig
from workers.trainer import PackedTrainer

SETTINGS = [("float32", 1), ("float32", 8), ("bfloat16", 8)]  # (dtype, length_buckets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = prepare_data(
        DataSection(path=str(DATA), top=1), shared=SharedSection(enabled=True, max_questions=args.questions)
    )
    rows, name = [], model_path(args.model)
    for dtype, buckets in SETTINGS:
        base = load_frozen_base(name, dtype, "cpu")
        train = encoded(base, data, "train", [SHARED], 512)
        bank = SoftPromptBank.initialise(base, [SHARED], args.num_virtual_tokens, "persona")
        config = TrainConfig(batch_size=args.batch_size, length_buckets=buckets, lr=0.005)
        trainer = PackedTrainer(base, bank, train, {}, config)
        batches = trainer.epoch_batches()
        tokens = sum(len(rows) * max(len(q.input_ids) for q in rows) for rows, _ in batches)
        trainer.epoch_batches = lambda batches=batches: batches  # time the epoch drawn above
        start = time.perf_counter()
        loss = trainer.train_epoch()[SHARED]
        seconds = time.perf_counter() - start
        rows.append(
            {
                "dtype": dtype,
                "length_buckets": buckets,
                "epoch_s": round(seconds, 2),
                "padded_tokens": tokens,
                "train_loss": round(loss, 4),
            }
        )
        print(rows[-1], flush=True)
    first = rows[0]["epoch_s"]
    report = {
        "machine": machine(),
        "model": args.model,
        "questions": len(train[SHARED]),
        "batch_size": args.batch_size,
        "rows": [r | {"speedup": round(first / r["epoch_s"], 2)} for r in rows],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
