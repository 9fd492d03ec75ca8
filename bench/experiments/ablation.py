"""The expert-design ablation: each way of building a culture's expert, scored side by side on one base.

For every prompt kind and length: the shared prior (culture-blind, trained on every country's pooled
answers), then the cultures' experts built (a) alone from their persona, (b) from a copy of the prior,
(c) as the prior followed by the culture's own input tokens (the prior frozen, or, for deep prompts, also
trained jointly by all the cultures). Each is trained packed, its best epoch chosen
by validation alignment; the table gives mean validation (what the choice is made on) and test alignment,
and each design's paired gain over the prior on the same records. `--prefix-layers` also trains (b) on only
the top K layers of its prefix (deep).

    python -m bench.experiments.ablation --config configs/demo.yaml --out runs/ablation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from orchestrator.config import SharedSection, load_config
from orchestrator.encoding import encoded
from orchestrator.survey import prepare_data
from workers.base_model import FrozenBase, load_frozen_base
from workers.cultures import SHARED
from workers.prompts import SoftPromptBank
from workers.scoring import EncodedQuestion, alignment, option_distributions, paired_bootstrap_ci
from workers.settings import TrainConfig
from workers.trainer import PackedTrainer

VARIANTS = ("persona", "from_shared", "shared+own")


def alignments(
    base: FrozenBase, bank: SoftPromptBank, expert: str, questions: list[EncodedQuestion]
) -> list[float]:
    """One expert's alignment on each of a culture's questions."""
    dists = option_distributions(base, bank, questions, [bank.index(expert)] * len(questions))
    return [alignment(d, q.target) for d, q in zip(dists, questions)]


def frozen_head(bank: SoftPromptBank, length: int) -> None:
    """Keep each expert's first `length` input tokens (the prior) fixed: their gradient is zero, so AdamW
    (no weight decay) never moves them."""
    for prompt in bank.prompts:
        prompt.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:length]), grad[length:]]))


def fit(base: FrozenBase, bank: SoftPromptBank, train: dict, val: dict, config: TrainConfig) -> float:
    """Train a bank packed (best epoch by validation); returns the seconds it took."""
    start = time.perf_counter()
    PackedTrainer(base, bank, train, val, config).fit()
    return time.perf_counter() - start


def variants(
    base: FrozenBase,
    kind: str,
    prior: SoftPromptBank,
    cultures: list[str],
    own_tokens: int,
    chosen: tuple[str, ...] = VARIANTS,
    prefix_layers: tuple[int | None, ...] = (None,),
):
    """(name, bank, prefix layers trained) of each chosen way to build the cultures' experts, given the
    trained prior of one kind; a bank is built only when chosen (the persona one costs forward passes)."""
    width = base.hidden_size
    none = [torch.zeros(0, width)] * len(cultures)
    if "persona" in chosen:
        persona = SoftPromptBank.initialise(base, cultures, prior_length(prior), "persona", kind=kind)
        yield "persona", persona, None
    if kind == "input":
        learned = prior.prompts[0].detach()
        if "from_shared" in chosen:
            yield "from_shared", SoftPromptBank(cultures, [learned] * len(cultures)).to(base.device), None
        if "shared+own" in chosen:
            mine = SoftPromptBank.initialise(base, cultures, own_tokens, "persona")
            composed = SoftPromptBank(cultures, [torch.cat([learned, p.detach()]) for p in mine.prompts])
            frozen_head(composed, learned.shape[0])
            yield "shared+own", composed.to(base.device), None
        return
    learned = prior.prefix(0).detach()
    if "from_shared" in chosen:
        for layers in prefix_layers:
            bank = SoftPromptBank(cultures, none, [learned] * len(cultures)).to(base.device)
            yield "from_shared", bank, layers
    if "shared+own" in chosen:
        for tied in (False, True):
            # The prior's prefix under each culture's own input tokens: frozen, or trained on by all of them.
            bank = SoftPromptBank.initialise(base, cultures, own_tokens, "persona", shared_prefix=learned)
            bank.shared_prefix.requires_grad_(tied)
            yield ("shared+own joint" if tied else "shared+own"), bank, None


def prior_length(prior: SoftPromptBank) -> int:
    return max(prior.lengths + prior.prefix_lengths)


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
    prior_scores: dict[str, dict[str, list[float]]] = {}  # the current prior's, per split and culture

    def score(
        bank: SoftPromptBank, kind: str, tokens: int, variant: str, seconds: float, layers: int | None = None
    ) -> None:
        row = {"kind": kind, "num_virtual_tokens": tokens, "variant": variant, "train_s": round(seconds, 1)}
        row["prefix_layers"] = layers or "all"
        for split in ("val", "test"):
            name = SHARED if variant == SHARED else None
            per = {c: alignments(base, bank, name or c, own[split][c]) for c in cultures}
            row[split] = float(np.mean([a for values in per.values() for a in values]))  # pooled over records
            row[f"{split}_by_culture"] = {c: float(np.mean(values)) for c, values in per.items()}
            if variant == SHARED:
                prior_scores[split] = per
                continue
            mine = [a for c in cultures for a in per[c]]
            prior = [a for c in cultures for a in prior_scores[split][c]]
            row[f"{split}_gain"] = float(np.mean(mine) - np.mean(prior))  # over the prior, same records
            row[f"{split}_gain_ci"] = paired_bootstrap_ci(mine, prior)
            row[f"{split}_above_prior"] = sum(
                bool(np.mean(per[c]) > np.mean(prior_scores[split][c])) for c in cultures
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_by_culture")}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every row: a cut-off run keeps its rows
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )

    for kind in args.kinds:
        for tokens in args.lengths:
            prior = SoftPromptBank.initialise(base, [SHARED], tokens, "persona", kind=kind)
            pooled = ({SHARED: splits["train"][SHARED]}, {SHARED: splits["val"][SHARED]})
            score(prior, kind, tokens, SHARED, fit(base, prior, *pooled, prior_cfg))
            chosen = variants(base, kind, prior, cultures, args.own_tokens, args.variants, args.prefix_layers)
            for variant, bank, layers in chosen:
                config = expert_cfg.model_copy(update={"prefix_layers": layers})
                seconds = fit(base, bank, own["train"], own["val"], config)
                score(bank, kind, tokens, variant, seconds, layers)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value")
    parser.add_argument("--kinds", nargs="+", default=["input", "deep"], choices=["input", "deep"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--prefix-layers",
        type=lambda v: None if v == "all" else int(v),
        nargs="+",
        default=[None],
        help="(b), deep: train the top K layers of the prefix; 'all' for every layer",
    )
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
