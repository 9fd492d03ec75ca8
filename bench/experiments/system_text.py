"""What the chat template's default system text costs a survey row: its tokens, training and scoring time.

Since workers/chat.py a conversation without a system message gets an empty one; before, templates such as
SmolLM2's inserted their own ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"). The
same cultures' questions are encoded both ways; each way trains the same packed deep experts for the same
steps (forward and backward) and scores the validation questions with the base alone. Read the ratios.

    python -m bench.experiments.system_text --model smollm2-135m --cultures 12 --steps 8 --out runs/bench/system_text.json
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

import workers.scoring
from bench.common import DATA, machine, model_path, seconds_per_row, write_report
from orchestrator.config import DataSection
from orchestrator.encoding import encoded
from orchestrator.survey import prepare_data
from workers.base_model import load_frozen_base
from workers.prompts import SoftPromptBank
from workers.settings import TrainConfig
from workers.trainer import PackedTrainer


@contextlib.contextmanager
def template_default_system():
    """Encode as before workers/chat.py: the template as it is, its default system text included."""
    chat_prompt = workers.scoring.chat_prompt

    def as_before(tokenizer, messages):
        if not tokenizer.chat_template:  # a model without a template (the chat rendering asks it too)
            return chat_prompt(tokenizer, messages)
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    workers.scoring.chat_prompt = as_before
    try:
        yield
    finally:
        workers.scoring.chat_prompt = chat_prompt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cultures", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8, help="packed micro-batches timed per format")
    parser.add_argument("--batch-size", type=int, default=2, help="rows of each expert a pass (the demo's)")
    parser.add_argument("--num-virtual-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = prepare_data(DataSection(path=str(DATA), top=args.cultures))
    cultures = data.selection.trained
    base = load_frozen_base(model_path(args.model), "float32", "cpu")
    start = SoftPromptBank.initialise(base, cultures, args.num_virtual_tokens, "persona", kind="deep")
    rows = []
    for name, encoding in [
        ("template default", template_default_system),
        ("empty system", contextlib.nullcontext),
    ]:
        with encoding():
            train = encoded(base, data, "train", cultures, 512)
            val = [q for qs in encoded(base, data, "val", cultures, 512).values() for q in qs]
        bank = SoftPromptBank(cultures, list(start.prompts), [p.detach() for p in start.prefixes])
        trainer = PackedTrainer(base, bank, train, {}, TrainConfig(batch_size=args.batch_size))
        batches = trainer.epoch_batches()[: args.steps]  # the same draw in each format: one seed
        train_s = seconds_per_row(trainer, batches)
        tic = time.perf_counter()
        dists = workers.scoring.option_distributions(base, None, val)
        score_s = (time.perf_counter() - tic) / len(val)
        base_alignment = np.mean([workers.scoring.alignment(d, q.target) for d, q in zip(dists, val)])
        rows.append(
            {
                "format": name,
                "tokens_per_row": round(float(np.mean([len(q.input_ids) for q in val])), 1),
                "train_s_per_row": round(train_s, 4),
                "score_s_per_row": round(score_s, 4),
                "base_val_alignment": round(float(base_alignment), 4),
            }
        )
        print(rows[-1], flush=True)
    first = rows[0]
    report = {
        "machine": machine(),
        "model": args.model,
        "experts": len(cultures),
        "train_rows": sum(len(rows) for rows, _ in batches),
        "val_rows": len(val),
        "rows": [
            r
            | {
                "train_speedup": round(first["train_s_per_row"] / r["train_s_per_row"], 2),
                "score_speedup": round(first["score_s_per_row"] / r["score_s_per_row"], 2),
            }
            for r in rows
        ],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
