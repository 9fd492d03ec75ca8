"""What a culture's deep expert costs to train by how many of its prefix's layers learn (`train.prefix_layers`).

K experts trained packed on their cultures' questions, the same batches from the same start in each setting:
every layer, then only the top ones (backpropagation stops below the lowest trained layer). Read the ratios.

    OMP_NUM_THREADS=2 python -m bench.experiments.expert_layers --model smollm2-135m --cultures 12 --steps 8 \
        --out runs/bench/expert_layers.json
"""

from __future__ import annotations

import argparse

from bench.common import DATA, machine, model_path, seconds_per_row, write_report
from orchestrator.config import DataSection
from orchestrator.encoding import encoded
from orchestrator.survey import prepare_data
from workers.base_model import load_frozen_base
from workers.prompts import SoftPromptBank
from workers.settings import TrainConfig
from workers.trainer import PackedTrainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cultures", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8, help="packed micro-batches timed per setting")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-virtual-tokens", type=int, default=32)
    parser.add_argument("--layers", nargs="+", default=["all", "16", "8"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = prepare_data(DataSection(path=str(DATA), top=args.cultures))
    cultures = data.selection.trained
    base = load_frozen_base(model_path(args.model), "float32", "cpu")
    train = encoded(base, data, "train", cultures, 512)
    start = SoftPromptBank.initialise(base, cultures, args.num_virtual_tokens, "persona", kind="deep")
    rows, batches = [], None
    for setting in args.layers:
        layers = None if setting == "all" else int(setting)
        bank = SoftPromptBank(cultures, list(start.prompts), [p.detach() for p in start.prefixes])
        trainer = PackedTrainer(
            base, bank, train, {}, TrainConfig(batch_size=args.batch_size, prefix_layers=layers)
        )
        batches = batches or trainer.epoch_batches()[: args.steps]  # the same rows in every setting
        seconds = seconds_per_row(trainer, batches)
        n = sum(len(r) for r, _ in batches)
        rows.append({"prefix_layers": setting, "rows": n, "s_per_row": round(seconds, 4)})
        print(rows[-1], flush=True)
    first = rows[0]["s_per_row"]
    report = {
        "machine": machine(),
        "model": args.model,
        "experts": len(cultures),
        "num_layers": start.prefixes[0].shape[1],
        "rows": [r | {"speedup": round(first / r["s_per_row"], 2)} for r in rows],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
