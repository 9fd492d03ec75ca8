"""The expert-design ablation: each way of building a culture's expert, scored side by side on one base.

For every prompt kind and length: the shared prior (culture-blind, trained on every country's pooled
answers), then the cultures' experts built (a) alone from their persona, (b) from a copy of the prior,
(c) as the prior (frozen) followed by the culture's own tokens. Each is trained packed, its best epoch chosen
by validation alignment; the table gives mean validation (what the choice is made on) and test alignment.

    python -m orchestrator.ablation --config configs/demo.yaml --out runs/ablation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from orchestrator.config import SharedSection, load_config
from orchestrator.experiment import encoded
from orchestrator.survey import prepare_data
from workers.base_model import FrozenBase, load_frozen_base
from workers.prompts import SoftPromptBank
from workers.scoring import EncodedQuestion, alignment, option_distributions
from workers.settings import SHARED, TrainConfig
from workers.trainer import PackedTrainer

VARIANTS = ("persona", "from_shared", "shared+own")


def alignments(
    base: FrozenBase, bank: SoftPromptBank, expert: str, questions: list[EncodedQuestion]
) -> list[float]:
    """One expert's alignment on each of a culture's questions."""
    dists = option_distributions(base, bank, questions, [bank.index(expert)] * len(questions))
    return [alignment(d, q.target) for d, q in zip(dists, questions)]


def frozen_head(bank: SoftPromptBank, length: int) -> None:
    """Keep each expert's first `length` virtual tokens (the prior) fixed: their gradient is zero, so
    AdamW (no weight decay) never moves them."""
    for prompt in bank.prompts:
        prompt.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:length]), grad[length:]]))


def fit(base: FrozenBase, bank: SoftPromptBank, train: dict, val: dict, config: TrainConfig) -> float:
    """Train a bank packed (best epoch by validation); returns the seconds it took."""
    start = time.perf_counter()
    PackedTrainer(base, bank, train, val, config).fit()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    config = load_config(args.config, args.set)
    data = prepare_data(config.data, shared=SharedSection(enabled=True, max_questions=args.prior_questions))
    cultures = data.selection.trained
    base = load_frozen_base(config.base_model.name, args.dtype or config.base_model.dtype, args.device)
    length = config.data.max_length
    splits = {s: encoded(base, data, s, [SHARED, *cultures], length) for s in ("train", "val", "test")}
    own = {s: {c: splits[s][c] for c in cultures} for s in splits}
    prior_cfg = TrainConfig(
        epochs=args.prior_epochs, batch_size=args.prior_batch, lr=args.prior_lr, patience=9
    )
    expert_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, patience=9)
    rows = []

    def score(bank: SoftPromptBank, name: str, variant: str, num_tokens: int, seconds: float) -> None:
        row = {
            "kind": "input",
            "num_virtual_tokens": num_tokens,
            "variant": variant,
            "train_s": round(seconds, 1),
        }
        for split in ("val", "test"):
            per = {c: alignments(base, bank, name or c, own[split][c]) for c in cultures}
            row[split] = float(np.mean([a for values in per.values() for a in values]))  # pooled over records
            row[f"{split}_by_culture"] = {c: float(np.mean(values)) for c, values in per.items()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_by_culture")}), flush=True)

    for num_tokens in args.lengths:
        prior = SoftPromptBank.initialise(base, [SHARED], num_tokens, "persona")
        seconds = fit(
            base, prior, {SHARED: splits["train"][SHARED]}, {SHARED: splits["val"][SHARED]}, prior_cfg
        )
        score(prior, SHARED, "shared", num_tokens, seconds)
        learned = prior.prompts[0].detach()

        persona = SoftPromptBank.initialise(base, cultures, num_tokens, "persona")
        score(persona, "", "persona", num_tokens, fit(base, persona, own["train"], own["val"], expert_cfg))

        copies = SoftPromptBank(cultures, [learned] * len(cultures)).to(base.device)
        score(copies, "", "from_shared", num_tokens, fit(base, copies, own["train"], own["val"], expert_cfg))

        mine = SoftPromptBank.initialise(base, cultures, args.own_tokens, "persona")
        composed = SoftPromptBank(cultures, [torch.cat([learned, p.detach()]) for p in mine.prompts]).to(
            base.device
        )
        frozen_head(composed, num_tokens)
        seconds = fit(base, composed, own["train"], own["val"], expert_cfg)
        score(composed, "", "shared+own", num_tokens + args.own_tokens, seconds)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument(
        "--own-tokens", type=int, default=8, help="a culture's own tokens after the prior (c)"
    )
    parser.add_argument(
        "--prior-questions", type=int, default=None, help="cap on the prior's training questions"
    )
    parser.add_argument("--prior-epochs", type=int, default=2)
    parser.add_argument("--prior-batch", type=int, default=8)
    parser.add_argument("--prior-lr", type=float, default=0.005)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation.json"))
    args = parser.parse_args(argv)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
