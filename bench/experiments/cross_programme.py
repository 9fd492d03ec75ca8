"""Across survey programmes: experts trained on one programme's questions, scored on the other's, both ways.

For each programme (`wvs`, then `pew`), the config's recipe is trained in this process (`shores train --local`)
with that programme held out (`data.transfer.hold_out`), then evaluated on the test split (the programme trained
on) and on `transfer_test` (the one held out), every rendering. It reports, per direction, each split's
pooled shared, expert and uniform, expert - shared with its interval and the experts below the prior, on
the rendering written as is and on the worst one.

    python -m bench.experiments.cross_programme --config configs/demo.yaml --out runs/bench/cross_programme.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import machine, write_report
from orchestrator.config import load_config
from orchestrator.evaluate import evaluate_beside_transfer, served_committees
from orchestrator.local_train import train_local
from orchestrator.survey import PROGRAMMES, prepare_data
from workers.base_model import load_frozen_base
from workers.cultures import SHARED
from workers.expert_store import SIMILARITY_FILE, load_experts, load_similarity
from workers.renderings import AS_WRITTEN


def row(section: dict, rendering: str) -> dict:
    """One split's pooled figures on one rendering."""
    part = section["renderings"][rendering]
    overall, diff = part["overall"], part["overall"]["differences"][f"expert-{SHARED}"]
    below = [
        c
        for c, r in part["cultures"].items()
        if (d := r["differences"].get(f"expert-{SHARED}")) and d["ci95"][1] < 0
    ]
    return {
        "rendering": rendering,
        "n": diff["n"],
        **{m: overall[m] for m in (SHARED, "expert", "uniform", "base")},
        "expert-shared": diff["mean"],
        "ci95": diff["ci95"],
        "below": below,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value")
    parser.add_argument("--programmes", nargs="+", choices=PROGRAMMES, default=list(PROGRAMMES))
    parser.add_argument("--output-dir", default="runs/cross_programme", help="each direction's experts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = {}
    for held_out in args.programmes:
        sets = [
            *args.set,
            f"data.transfer.hold_out={held_out}",
            f"output_dir={Path(args.output_dir) / held_out}",
        ]
        config = load_config(args.config, sets)
        train_local(config, replace=True)
        base = load_frozen_base(config.base_model.name, config.base_model.dtype, "cpu")
        experts = load_experts(config.experts_dir, base)
        data = prepare_data(config.data)
        routing = config.serve.routing
        similarity = load_similarity(config.experts_dir / SIMILARITY_FILE)
        report = evaluate_beside_transfer(
            base,
            experts,
            data,
            "test",
            data.selection.trained + data.selection.held_out,
            committees=served_committees(
                experts, similarity, routing.committee_size, routing.routing_temperature
            ),
            batch_size=config.eval.batch_size,
            max_length=config.data.max_length,
            n_bootstrap=config.eval.bootstrap,
        )
        results[f"held out: {held_out}"] = {
            split: [row(section, AS_WRITTEN), row(section, section["worst_rendering"]["expert"])]
            for split, section in (("test", report), ("transfer_test", report["transfer"]))
        }
        for split, rows in results[f"held out: {held_out}"].items():
            for r in rows:
                print(
                    f"{held_out} held out, {split:<14}{r['rendering']:<16} n {r['n']:>4}  shared {r[SHARED]:.3f}  "
                    f"expert {r['expert']:.3f}  uniform {r['uniform']:.3f}  expert - shared {r['expert-shared']:+.3f} "
                    f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]  below: {', '.join(r['below']) or 'none'}",
                    flush=True,
                )
    write_report(
        {"machine": machine(), "config": args.config, "sets": args.set, "results": results}, args.out
    )


if __name__ == "__main__":
    main()
