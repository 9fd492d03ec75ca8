"""Ways to keep an expert from harming answers however a question is written, side by side on the same splits
and renderings.

The shared prior and each culture's expert answer every record of val and test (and of the transfer split,
where the config has one) in every rendering of `workers/renderings.py`: options as written alone, and both
option orders combined in log space (what shores serves, `workers/scoring.py::order_averaged`). Each candidate is
fitted on val only:

- `raw, written order`: the expert as trained, its options in the written order alone;
- `raw, orders' arithmetic mean`: the expert as trained, the plain mean of both orders' answers;
- `raw`: the expert as trained, both orders combined in log space;
- `mix per culture, as written`: (1 - w) expert + w prior, each culture's w best on its val records as written;
- `mix per culture, worst rendering`: each culture's w best on its val records' worst rendering (what
  `shores train` fits, `orchestrator/calibration.py`);
- `mix pooled, worst rendering`: one w for every culture, best on the pooled worst rendering.

A temperature on both the prior's and the experts' answers (`temperature_scan`: each answer's probabilities
raised to 1/T and renormalised) is scanned beside them: T is chosen on val's worst rendering, and test reports it
by option count, since a sharper answer helps where the model knows and harms where it is below uniform.

The choice is the candidate whose worst rendering gains most over the prior on val out of sample: fitted on one
half of each culture's val records, scored on the other (2-fold, 20 random halvings, `cross_fitted`). Run it on
experts trained with and without renderings (`--set train.renderings=false`) to compare the training side.

    python -m bench.experiments.rendering_candidates --config configs/demo.yaml --experts runs/demo/experts \
        --out runs/bench/rendering_candidates.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from bench.common import machine, write_report
from orchestrator.config import load_config
from orchestrator.encoding import encode
from orchestrator.survey import TRANSFER_SPLITS, prepare_data
from workers.base_model import load_frozen_base
from workers.committees import PRIOR_WEIGHTS, worst_rendering_scores
from workers.cultures import SHARED, is_shared
from workers.expert_store import load_experts
from workers.prompts import bank_from_experts
from workers.renderings import RENDERINGS
from workers.scoring import alignment, option_distributions, paired_bootstrap_ci

# culture, survey, and the prior's and expert's answers: written order, both orders' mean, both combined
Row = dict
Answer = Callable[[Row], np.ndarray]
ORDERS_MEAN = "raw, orders' arithmetic mean"


def score_all(config, experts, base, splits: list[str]) -> dict[str, dict[str, list[Row]]]:
    """Per split and rendering, one row a record of a trained culture: its survey target and the prior's and
    its expert's answers, written order alone (`*_1`), the arithmetic mean of both orders (`*_a`) and both
    combined as served (`*_2`), in one batched pass a split (each order's rows are among the combined ones,
    so they cost nothing more)."""
    data = prepare_data(config.data)
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    own = [c for c in index if not is_shared(c)]
    bank = bank_from_experts(experts, base.device)
    out = {}
    for split in splits:
        records = [r for rs in data.records_of(split, own).values() for r in rs]
        questions, idx, keys = [], [], []
        for name in RENDERINGS:
            for record, q in zip(records, encode(base, records, config.data.max_length, shown=name)):
                for who in (SHARED, record.culture):
                    questions += [
                        replace(q, reversed_ids=None),
                        replace(q, input_ids=q.reversed_ids, reversed_ids=None),
                        q,
                    ]
                    idx += [index[who]] * 3
                keys.append((name, record, q))
        dists = iter(option_distributions(base, bank, questions, idx, config.eval.batch_size, progress=split))
        out[split] = defaultdict(list)
        for name, record, q in keys:
            (p1, p_rev, p2), (e1, e_rev, e2) = ([next(dists) for _ in range(3)] for _ in range(2))
            row = {"culture": record.culture, "survey": np.asarray(q.target), "p1": p1, "p2": p2, "e1": e1}
            arithmetic = {"pa": (p1 + p_rev[::-1]) / 2, "ea": (e1 + e_rev[::-1]) / 2}
            out[split][name].append(row | arithmetic | {"e2": e2})
    return out


def mix(row: Row, w: float) -> np.ndarray:
    return (1 - w) * row["e2"] + w * row["p2"]


def rows_for_fit(by_rendering: dict[str, list[Row]], keep: Callable[[int, Row], bool]) -> dict:
    """(expert, prior, survey) rows per culture and rendering, of the records `keep(i, row)` admits."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for name, rows in by_rendering.items():
        for i, r in enumerate(rows):
            if keep(i, r):
                out[r["culture"]][name].append((r["e2"], r["p2"], r["survey"]))
    return out


def candidates(by_rendering: dict[str, list[Row]], keep=lambda i, r: True) -> dict[str, tuple[Answer, dict]]:
    """Each candidate's answer for a record, fitted on the val rows `keep` admits."""
    fit = rows_for_fit(by_rendering, keep)
    worst = {c: PRIOR_WEIGHTS[int(np.argmax(worst_rendering_scores(r)))] for c, r in fit.items()}
    cautious = {c: one_se_weight(r) for c, r in fit.items()}
    written = {
        c: PRIOR_WEIGHTS[int(np.argmax(worst_rendering_scores({"as_written": r["as_written"]})))]
        for c, r in fit.items()
    }
    pooled_rows = defaultdict(list)
    for by_name in fit.values():
        for name, rows in by_name.items():
            pooled_rows[name] += rows
    pooled = PRIOR_WEIGHTS[int(np.argmax(worst_rendering_scores(pooled_rows)))]
    return {
        "raw, written order": (lambda r: r["e1"], {}),
        ORDERS_MEAN: (lambda r: r["ea"], {}),
        "raw": (lambda r: r["e2"], {}),
        "mix per culture, as written": (lambda r: mix(r, written.get(r["culture"], 0.0)), {"w": written}),
        "mix per culture, worst rendering": (lambda r: mix(r, worst.get(r["culture"], 0.0)), {"w": worst}),
        "mix per culture, worst rendering, 1 SE": (
            lambda r: mix(r, cautious.get(r["culture"], 0.0)),
            {"w": cautious},
        ),
        "mix pooled, worst rendering": (lambda r: mix(r, pooled), {"w": pooled}),
    }


def one_se_weight(rows: dict) -> float:
    """The largest w whose worst-rendering score is within one standard error of the best w's: the best's
    paired gain over the prior, on its worst rendering, counts only as far as it stands out of its noise."""
    scores = worst_rendering_scores(rows)
    best = int(np.argmax(scores))
    w = PRIOR_WEIGHTS[best]
    weakest = min(
        rows.values(), key=lambda rs: np.mean([alignment((1 - w) * e + w * p, s) for e, p, s in rs])
    )
    gains = [alignment((1 - w) * e + w * p, s) - alignment(p, s) for e, p, s in weakest]
    se = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return max(g for g, score in zip(PRIOR_WEIGHTS, scores) if score >= scores[best] - se)


def prior_of(name: str) -> str:
    """The prior's answer a candidate is compared with: the same order handling as the candidate's."""
    return {"raw, written order": "p1", ORDERS_MEAN: "pa"}.get(name, "p2")


def worst_gain(by_rendering: dict[str, list[Row]], answer: Answer, prior: str, keep) -> float:
    """The lowest over renderings of the mean paired gain of `answer` over the prior, on the rows kept."""
    gains = []
    for rows in by_rendering.values():
        kept = [r for i, r in enumerate(rows) if keep(i, r)]
        gains.append(
            np.mean([alignment(answer(r), r["survey"]) - alignment(r[prior], r["survey"]) for r in kept])
        )
    return float(min(gains))


def cross_fitted(by_rendering: dict[str, list[Row]], repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """Each candidate's worst-rendering gain on one half of each culture's val records when fitted on the other."""
    rng = np.random.default_rng(seed)
    first = by_rendering["as_written"]
    gains = defaultdict(list)
    for _ in range(repeats):
        half = np.zeros(len(first), bool)
        for culture in {r["culture"] for r in first}:
            mine = [i for i, r in enumerate(first) if r["culture"] == culture]
            half[rng.permutation(mine)[: len(mine) // 2]] = True
        for side in (True, False):
            fitted = candidates(by_rendering, lambda i, r, s=side, h=half: h[i] == s)
            for name, (answer, _) in fitted.items():
                held = worst_gain(
                    by_rendering, answer, prior_of(name), lambda i, r, s=side, h=half: h[i] != s
                )
                gains[name].append(held)
    return {name: float(np.mean(v)) for name, v in gains.items()}


def uniform(rows: list[Row]) -> float:
    """The mean alignment of equal shares over each record's options."""
    return float(
        np.mean([alignment(np.full(len(r["survey"]), 1 / len(r["survey"])), r["survey"]) for r in rows])
    )


def summary(rows: list[Row], answer: Answer, prior: str) -> dict:
    """Pooled answer and prior, the paired gain with its interval, cultures above the prior and below it (their
    interval under 0), and uniform."""
    a = [alignment(answer(r), r["survey"]) for r in rows]
    s = [alignment(r[prior], r["survey"]) for r in rows]
    per = defaultdict(lambda: ([], []))
    for r, x, y in zip(rows, a, s):
        per[r["culture"]][0].append(x)
        per[r["culture"]][1].append(y)
    return {
        "n": len(rows),
        "expert": float(np.mean(a)),
        "shared": float(np.mean(s)),
        "uniform": uniform(rows),
        "diff": float(np.mean(np.subtract(a, s))),
        "ci95": list(paired_bootstrap_ci(a, s)),
        "above": f"{sum(np.mean(x) > np.mean(y) for x, y in per.values())}/{len(per)}",
        "below": sorted(c for c, (x, y) in per.items() if paired_bootstrap_ci(x, y)[1] < 0),
    }


TEMPERATURES = (0.5, 0.6, 0.7, 0.85, 1.0, 1.25, 1.5)
WHO = {
    SHARED: "p2",
    "expert": "e2",
}  # the answers a temperature is scanned on: as served, both orders combined
# Option counts apart: a ten-point value scale is where a small model is below uniform.
OPTION_COUNTS = {"2-7 options": range(2, 8), "8+ options": range(8, 100)}


def tempered(answer: np.ndarray, t: float) -> np.ndarray:
    sharper = answer ** (1 / t)
    return sharper / sharper.sum()


def temperature_scan(scored: dict[str, dict[str, list[Row]]]) -> dict:
    """For each T: the prior's and the experts' (alone) mean alignment on val's worst rendering, and on test
    per rendering and per option count, with uniform beside them; `chosen` is the T best on val."""
    out: dict = {"temperatures": {}}

    def mean(rows: list[Row], key: str, t: float) -> float:
        return (
            float(np.mean([alignment(tempered(r[key], t), r["survey"]) for r in rows]))
            if rows
            else float("nan")
        )

    for t in TEMPERATURES:
        val = {who: min(mean(rows, key, t) for rows in scored["val"].values()) for who, key in WHO.items()}
        test = {
            f"{name}, {group}": {
                "n": len(kept := [r for r in rows if len(r["survey"]) in counts]),
                **{who: mean(kept, key, t) for who, key in WHO.items()},
                "uniform": uniform(kept) if kept else float("nan"),
            }
            for name, rows in scored["test"].items()
            for group, counts in OPTION_COUNTS.items()
        }
        out["temperatures"][t] = {"val_worst_rendering": val, "test": test}
    out["chosen"] = max(
        TEMPERATURES, key=lambda t: sum(out["temperatures"][t]["val_worst_rendering"].values())
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--experts", required=True, help="a directory of experts with the shared prior")
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    base = load_frozen_base(config.base_model.name, config.base_model.dtype, "cpu")
    experts = load_experts(args.experts, base)
    if not any(is_shared(e.meta.culture) for e in experts):
        parser.error(f"no shared prior among the experts in {args.experts}")
    splits = ["val", "test", *(TRANSFER_SPLITS if config.data.transfer is not None else ())]
    scored = score_all(config, experts, base, splits)
    fitted = candidates(scored["val"])
    chosen_by = cross_fitted(scored["val"])
    table = {
        name: {
            "fitted": params,
            "cross_fitted": chosen_by[name],
            **{
                split: {r: summary(scored[split][r], answer, prior_of(name)) for r in RENDERINGS}
                for split in splits
            },
        }
        for name, (answer, params) in fitted.items()
    }
    for split in splits:
        print(f"\n{split}: expert - shared [95%], cultures above / below the prior; shared and uniform")
        print(f"{'candidate':<34}{'cross-fitted':>13}  " + "".join(f"{r:<40}" for r in RENDERINGS))
        for name, row in table.items():
            cells = [
                f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f},{c['ci95'][1]:+.3f}] {c['above']} {len(c['below'])}"
                for c in (row[split][r] for r in RENDERINGS)
            ]
            print(f"{name:<34}{row['cross_fitted']:>+13.4f}  " + "".join(f"{c:<40}" for c in cells))
        cells = [f"{row[split][r]['shared']:.3f} / {row[split][r]['uniform']:.3f}" for r in RENDERINGS]
        print(f"{'shared / uniform':<49}" + "".join(f"{c:<40}" for c in cells))
    temperature = temperature_scan(scored)
    print(f"\ntemperature on the prior's and experts' answers (chosen on val: {temperature['chosen']})")
    for t, row in temperature["temperatures"].items():
        val = row["val_worst_rendering"]
        cells = [
            f"{name} {c[SHARED]:.3f}/{c['expert']:.3f}/{c['uniform']:.3f}"
            for name, c in row["test"].items()
            if name.startswith(("as_written", "no_missing"))
        ]
        print(f"T {t:<5} val worst {val[SHARED]:.4f}/{val['expert']:.4f}  test " + "  ".join(cells))
    write_report(
        {
            "machine": machine(),
            "config": args.config,
            "experts": args.experts,
            "candidates": table,
            "temperature": temperature,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
