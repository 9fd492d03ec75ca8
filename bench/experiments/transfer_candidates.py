"""Ways to keep an expert from harming answers off its training distribution, side by side on the same splits.

The shared prior, each culture's expert and its committee's members score every record of val, test,
transfer_val and transfer_test once. Each candidate is then fitted on transfer_val (the format-gated one also
on val; never test, never transfer_test) and scored on every split. The choice is the candidate with the best gain over the prior on transfer_val
out of sample: fitted on one half of each culture's records, scored on the other (`cross_fitted`).

- `raw`: the expert as trained;
- `mix pooled`: (1 - w) expert + w prior, one w for every culture;
- `mix per culture`: the same with each culture's own w (what `shores train` fits with
  `shared.expert_prior_weight: auto`, `orchestrator/calibration.py`);
- `mix per culture, shrunk`: each culture's w best on its own records and all records, counted equally;
- `mix per culture, format-gated`: two w per culture, one fitted on val for questions whose answer formats are
  like the training data's, one on transfer_val for the others (what `shores train` fits with a transfer
  split: `workers/answer_formats.py`);
- `log-linear pooled`: prior^(1 - a) expert^a, renormalised, one a in [0, 1.5] (a > 1 extrapolates);
- `temperature pooled`: expert^(1 / T), renormalised, one T.

Cultures without an expert (`data.held_out`) are answered by committees of their nearest experts: raw, of the
mixed members (as `shores serve` answers), and of the mixed members with the prior added at a weight chosen
leave-one-culture-out on transfer_val. It also prints the prior's alignment by number of options on each split.

    python -m bench.experiments.transfer_candidates --config configs/demo.yaml --experts runs/demo/experts \
        --out runs/bench/transfer_candidates.json
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import machine, write_report
from orchestrator.calibration import choose_weights, fit_format_gate
from orchestrator.config import load_config
from orchestrator.encoding import encode
from orchestrator.survey import prepare_data
from workers.base_model import load_frozen_base
from workers.committees import PRIOR_WEIGHTS, ranked_committee
from workers.cultures import SHARED, is_shared
from workers.expert_file import Expert
from workers.expert_store import SIMILARITY_FILE, load_experts, load_similarity
from workers.prompts import bank_from_experts
from workers.scoring import alignment, paired_bootstrap_ci
from workers.scoring import option_distributions as model_distributions

SPLITS = ("val", "test", "transfer_val", "transfer_test")
FITS = {"transfer_val": ("transfer_val",), "val+transfer_val": ("val", "transfer_val")}
MIX_GRID = PRIOR_WEIGHTS
LOGLINEAR_GRID = tuple(i / 10 for i in range(16))
TEMPERATURES = (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0)


def score_all(config, experts: list[Expert], base, members: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Per split, one row a record: its culture, survey distribution, and the distributions of the prior, its
    culture's expert and the experts of `members[culture]` (its committee)."""
    data = prepare_data(config.data)
    cultures = data.selection.trained + data.selection.held_out
    bank = bank_from_experts(experts, base.device)
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    out = {}
    for split in SPLITS:
        records = [r for c, rs in data.records_of(split, cultures).items() for r in rs]
        plain = encode(base, records, config.data.max_length)
        wanted = [sorted({SHARED, *members.get(r.culture, [])} | ({r.culture} & set(index))) for r in records]
        questions = [q for q, names in zip(plain, wanted) for _ in names]
        idx = [index[name] for names in wanted for name in names]
        dists = iter(model_distributions(base, bank, questions, idx, config.eval.batch_size, progress=split))
        out[split] = [
            {
                "culture": r.culture,
                "options": r.options,
                "survey": np.asarray(r.distribution),
                "by_expert": {n: next(dists) for n in names},
            }
            for r, names in zip(records, wanted)
        ]
    return out


def mix(e: np.ndarray, p: np.ndarray, w: float) -> np.ndarray:
    return (1 - w) * e + w * p


def loglinear(e: np.ndarray, p: np.ndarray, a: float) -> np.ndarray:
    logits = (1 - a) * np.log(np.maximum(p, 1e-12)) + a * np.log(np.maximum(e, 1e-12))
    q = np.exp(logits - logits.max())
    return q / q.sum()


def tempered(e: np.ndarray, t: float) -> np.ndarray:
    q = np.exp(np.log(np.maximum(e, 1e-12)) / t)
    return q / q.sum()


def best(grid, score: Callable[[float], float]) -> float:
    """The grid value with the best score; ties to the first (the one nearest the prior)."""
    scores = [score(v) for v in grid]
    return grid[int(np.argmax(scores))]


def mean_score(rows, answer: Callable[[dict], np.ndarray]) -> float:
    return float(np.mean([alignment(answer(r), r["survey"]) for r in rows])) if rows else float("nan")


def candidates(
    fit_rows: list[dict], own: list[str], val_rows: list[dict]
) -> dict[str, Callable[[dict], np.ndarray]]:
    """Each candidate's answer function for a trained culture's record, fitted on `fit_rows` only (the
    format-gated one also on `val_rows`, for familiar questions; rows carry `familiar`)."""
    own_rows = [r for r in fit_rows if r["culture"] in own]
    by_culture = defaultdict(list)
    for r in own_rows:
        by_culture[r["culture"]].append(r)

    def expert(r):
        return r["by_expert"][r["culture"]]

    def prior(r):
        return r["by_expert"][SHARED]

    w_pool = best(MIX_GRID, lambda w: mean_score(own_rows, lambda r: mix(expert(r), prior(r), w)))
    # Per culture: what `shores train` fits (orchestrator/calibration.py).
    fits = choose_weights(
        {c: [(expert(r), prior(r), r["survey"]) for r in rows] for c, rows in by_culture.items()}
    )
    w_culture = {c: fit.weight for c, fit in fits.items()}
    val_fits = choose_weights(
        {
            c: [(expert(r), prior(r), r["survey"]) for r in val_rows if r["culture"] == c]
            for c in own
            if any(r["culture"] == c for r in val_rows)
        }
    )
    w_familiar = {c: fit.weight for c, fit in val_fits.items()}

    def gated(r):
        w = w_familiar.get(r["culture"], 0.0) if r["familiar"] else w_culture.get(r["culture"], w_pool)
        return mix(expert(r), prior(r), w)

    w_shrunk = {
        c: best(
            MIX_GRID,
            lambda w, rows=rows: (
                mean_score(rows, lambda r: mix(expert(r), prior(r), w))
                + mean_score(own_rows, lambda r: mix(expert(r), prior(r), w))
            ),
        )
        for c, rows in by_culture.items()
    }
    a_pool = best(LOGLINEAR_GRID, lambda a: mean_score(own_rows, lambda r: loglinear(expert(r), prior(r), a)))
    t_pool = best(TEMPERATURES, lambda t: mean_score(own_rows, lambda r: tempered(expert(r), t)))
    return {
        "raw": (expert, {}),
        "mix pooled": (lambda r: mix(expert(r), prior(r), w_pool), {"w": w_pool}),
        "mix per culture": (
            lambda r: mix(expert(r), prior(r), w_culture.get(r["culture"], w_pool)),
            {"w": w_culture},
        ),
        "mix per culture, shrunk": (
            lambda r: mix(expert(r), prior(r), w_shrunk.get(r["culture"], w_pool)),
            {"w": w_shrunk},
        ),
        "mix per culture, format-gated": (gated, {"w familiar": w_familiar, "w unfamiliar": w_culture}),
        "log-linear pooled": (lambda r: loglinear(expert(r), prior(r), a_pool), {"a": a_pool}),
        "temperature pooled": (lambda r: tempered(expert(r), t_pool), {"T": t_pool}),
    }


def cross_fitted(
    rows: list[dict], own: list[str], val_rows: list[dict], repeats: int = 20, seed: int = 0
) -> dict[str, float]:
    """Each candidate's mean paired gain over the prior on one half of each culture's `rows` when fitted on
    the other half (2-fold, `repeats` random halvings): the choice by transfer validation, out of sample."""
    rng = np.random.default_rng(seed)
    gains = defaultdict(list)
    for _ in range(repeats):
        folds = [[], []]
        for culture in own:
            mine = [r for r in rows if r["culture"] == culture]
            for j, i in enumerate(rng.permutation(len(mine))):
                folds[j % 2].append(mine[i])
        for k in range(2):
            for name, (answer, _) in candidates(folds[k], own, val_rows).items():
                held = folds[1 - k]
                shared = [alignment(r["by_expert"][SHARED], r["survey"]) for r in held]
                gains[name].append(
                    float(np.mean([alignment(answer(r), r["survey"]) for r in held]) - np.mean(shared))
                )
    return {name: float(np.mean(v)) for name, v in gains.items()}


def summary(rows: list[dict], answer, own: list[str]) -> dict:
    """Pooled mean, mean shared, paired expert - shared with its interval, and per-culture counts."""
    rows = [r for r in rows if r["culture"] in own]
    a = [alignment(answer(r), r["survey"]) for r in rows]
    s = [alignment(r["by_expert"][SHARED], r["survey"]) for r in rows]
    per = defaultdict(lambda: ([], []))
    for r, x, y in zip(rows, a, s):
        per[r["culture"]][0].append(x)
        per[r["culture"]][1].append(y)
    above = sum(np.mean(x) > np.mean(y) for x, y in per.values())
    below = sum(paired_bootstrap_ci(x, y)[1] < 0 for x, y in per.values())
    return {
        "n": len(rows),
        "expert": float(np.mean(a)),
        "shared": float(np.mean(s)),
        "diff": float(np.mean(np.subtract(a, s))),
        "ci95": list(paired_bootstrap_ci(a, s)),
        "above": f"{above}/{len(per)}",
        "below_ci": int(below),
    }


def committee_rows(rows, committees, member_answer, prior_weight: float) -> list[tuple[float, float]]:
    """(committee, shared) alignment of each record of a culture that has a committee."""
    out = []
    for r in rows:
        if r["culture"] not in committees:
            continue
        c = sum(w * member_answer(r, m) for m, w in committees[r["culture"]].members)
        c = mix(c, r["by_expert"][SHARED], prior_weight)
        out.append((alignment(c, r["survey"]), alignment(r["by_expert"][SHARED], r["survey"])))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--experts", required=True, help="a directory of experts with the shared prior")
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value")
    parser.add_argument("--fit", choices=sorted(FITS), default="transfer_val", help="the records fitted on")
    parser.add_argument(
        "--cache", default=None, help="a pickle of the scored records: written, or read if there"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    if config.data.transfer is None:
        parser.error("the config needs data.transfer (a transfer split to fit on)")
    base = load_frozen_base(config.base_model.name, config.base_model.dtype, "cpu")
    experts = load_experts(args.experts, base)
    names = [e.meta.culture for e in experts]
    own = [c for c in names if not is_shared(c)]
    similarity = load_similarity(Path(args.experts) / SIMILARITY_FILE)
    routing = config.serve.routing

    def committees_for(cultures, pool):
        out = {}
        for c in cultures:
            scores = {m: v for m, v in similarity.get(c, {}).items() if m in pool and m != c}
            if scores:
                out[c] = ranked_committee(scores, routing.committee_size, routing.routing_temperature)
        return out

    # Committees of the held-out cultures, and leave-one-culture-out committees of the trained ones.
    held = committees_for(config.data.held_out, own)
    loco = committees_for(own, own)
    members = {c: committee.cultures for c, committee in (loco | held).items()}
    if args.cache and Path(args.cache).exists():
        scored = pickle.loads(Path(args.cache).read_bytes())
    else:
        scored = score_all(config, experts, base, members)
        if args.cache:
            Path(args.cache).write_bytes(pickle.dumps(scored))
    # The format gate `shores train` fits: the training split's answer formats, val told from transfer_val.
    gate = fit_format_gate(prepare_data(config.data), own)
    for rows in scored.values():
        for r in rows:
            r["familiar"] = gate is not None and gate.familiar(r["options"])
    fit_rows = [r for split in FITS[args.fit] for r in scored[split]]
    fitted = candidates(fit_rows, own, scored["val"])
    chosen_by = cross_fitted(fit_rows, own, scored["val"])
    table = {
        name: {
            "fitted": params,
            "cross_fitted": chosen_by[name],
            **{s: summary(scored[s], answer, own) for s in SPLITS},
        }
        for name, (answer, params) in fitted.items()
    }
    print(f"{'candidate':<26}{'cross-fitted':>13}  " + "".join(f"{s:<38}" for s in SPLITS))
    for name, row in table.items():
        cells = [
            f"{row[s]['expert']:.3f} {row[s]['diff']:+.3f} [{row[s]['ci95'][0]:+.3f},{row[s]['ci95'][1]:+.3f}] "
            f"{row[s]['above']} {row[s]['below_ci']}"
            for s in SPLITS
        ]
        print(f"{name:<26}{row['cross_fitted']:>+13.4f}  " + "".join(f"{c:<38}" for c in cells))

    served = fitted["mix per culture, format-gated"][1]  # what shores train fits

    def raw_member(r, m):
        return r["by_expert"][m]

    def mixed_member(r, m):
        weights = served["w familiar"] if r["familiar"] else served["w unfamiliar"]
        return mix(r["by_expert"][m], r["by_expert"][SHARED], weights.get(m, 0.0))

    prior_w = best(
        MIX_GRID,
        lambda w: float(np.mean([a for a, _ in committee_rows(fit_rows, loco, mixed_member, w)])),
    )
    committees = {}
    for name, member, w in [
        ("raw members", raw_member, 0.0),
        ("mixed members", mixed_member, 0.0),
        (f"mixed members + prior {prior_w:g}", mixed_member, prior_w),
    ]:
        committees[name] = {}
        for s in SPLITS:
            pairs = committee_rows(scored[s], held, member, w)
            if pairs:
                a, b = zip(*pairs)
                committees[name][s] = {
                    "n": len(a),
                    "committee": float(np.mean(a)),
                    "shared": float(np.mean(b)),
                    "diff": float(np.mean(np.subtract(a, b))),
                    "ci95": list(paired_bootstrap_ci(a, b)),
                }
        print(
            f"committee, {name:<32}"
            + "".join(
                f"{v['committee']:.3f} {v['diff']:+.3f} [{v['ci95'][0]:+.3f},{v['ci95'][1]:+.3f}]".rjust(36)
                for v in committees[name].values()
            )
        )

    by_options = {}
    for s in SPLITS:
        groups = defaultdict(list)
        for r in scored[s]:
            n = len(r["survey"])
            groups[n].append(
                (alignment(r["by_expert"][SHARED], r["survey"]), alignment(np.full(n, 1 / n), r["survey"]))
            )
        by_options[s] = {
            n: {
                "n": len(v),
                "shared": float(np.mean([a for a, _ in v])),
                "uniform": float(np.mean([u for _, u in v])),
            }
            for n, v in sorted(groups.items())
        }
        print(s, {n: f"{v['n']}: {v['shared']:.3f}/{v['uniform']:.3f}" for n, v in by_options[s].items()})
    write_report(
        {
            "machine": machine(),
            "config": args.config,
            "hold_out": config.data.transfer.hold_out,
            "fit": args.fit,
            "candidates": table,
            "committees": committees,
            "committee_prior_weight": prior_w,
            "format_gate": gate and {"threshold": gate.threshold, "grams": len(gate.grams)},
            "prior_by_options": by_options,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
