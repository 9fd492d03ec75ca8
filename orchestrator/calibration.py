"""Each expert's share of the shared prior, fitted on records unlike its training data.

An expert fitted to ~50 questions of one survey can learn that survey's questions rather than its culture,
and then answers another survey's questions worse than the culture-blind prior. So an expert answers as
(1 - w) expert + w prior, its distributions mixed. Its w (`ExpertMeta.prior_weight`) is the weight of
PRIOR_WEIGHTS whose mixture scores best on the calibration split: `transfer_val`, the held-out programme's
questions, with `data.transfer`; else `val`. Test and transfer_test are never read: `calibration_split`
is the only split these functions score.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from orchestrator.config import ExperimentConfig
from orchestrator.encoding import encode
from orchestrator.results import Winner
from orchestrator.survey import ExperimentData
from workers.base_model import FrozenBase
from workers.committees import PRIOR_WEIGHTS
from workers.cultures import SHARED, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH
from workers.expert_file import Expert, load_expert, save_expert
from workers.prompts import bank_from_experts
from workers.scoring import alignment, option_distributions


def calibration_split(data: ExperimentData) -> str:
    """Where the prior's weights are fitted: the transfer split's validation half, else validation."""
    return "transfer_val" if data.transfer is not None else "val"


@dataclass(frozen=True)
class PriorWeightFit:
    """One culture's fitted weight, the records it was fitted on, and their mean alignment at w = 0 and w."""

    weight: float
    n: int
    expert: float
    mixed: float


def mixture_scores(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: Sequence[float]
) -> np.ndarray:
    """Mean alignment of (1 - w) expert + w prior with the survey, for each w of `grid`: rows of (expert,
    prior, survey) distributions."""
    return np.array([np.mean([alignment((1 - w) * e + w * p, s) for e, p, s in rows]) for w in grid])


def choose_weights(
    rows: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    grid: Sequence[float] = PRIOR_WEIGHTS,
) -> dict[str, PriorWeightFit]:
    """Each culture's weight of `grid` with the best mean of its own records' score and all cultures' score.

    A culture has ~10 calibration records: its own optimum alone is mostly noise, so it is averaged,
    equally, with the pooled optimum's curve. Ties go to the smaller weight (the expert's own answer).
    """
    pooled = mixture_scores([r for culture_rows in rows.values() for r in culture_rows], grid)
    out = {}
    for culture, culture_rows in rows.items():
        own = mixture_scores(culture_rows, grid)
        best = int(np.argmax(own + pooled))  # argmax: the first (smallest) of equal bests
        out[culture] = PriorWeightFit(float(grid[best]), len(culture_rows), float(own[0]), float(own[best]))
    return out


def fit_prior_weights(
    base: FrozenBase,
    experts: list[Expert],
    data: ExperimentData,
    grid: Sequence[float] = PRIOR_WEIGHTS,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> dict[str, PriorWeightFit]:
    """Each culture's expert's weight of the prior, fitted on its records of the calibration split.

    `experts` must hold the shared prior; a culture without calibration records gets no fit (its expert
    answers alone).
    """
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    if SHARED not in index:
        raise ValueError("fitting the prior's weights needs the shared prior among the experts")
    cultures = [c for c in index if not is_shared(c)]
    split = calibration_split(data)
    records = [r for rs in data.records_of(split, cultures).values() for r in rs]
    if not records:
        return {}
    plain = encode(base, records, max_length)
    questions = [q for q in plain for _ in range(2)]
    expert_idx = [i for r in records for i in (index[r.culture], index[SHARED])]
    dists = option_distributions(
        base, bank_from_experts(experts, base.device), questions, expert_idx, batch_size
    )
    rows = defaultdict(list)
    for k, record in enumerate(records):
        rows[record.culture].append((dists[2 * k], dists[2 * k + 1], np.asarray(record.distribution)))
    return choose_weights(rows, grid)


def calibrate_experts(
    base: FrozenBase,
    expert_files: Mapping[str, object],
    prior_file: object,
    data: ExperimentData,
    setting: float | str | None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> dict[str, float]:
    """Write each culture's prior weight into its expert file (`shared.expert_prior_weight`): `auto` fits it
    (`fit_prior_weights`), a number sets it for all; returns the weights written."""
    experts = {c: load_expert(path) for c, path in expert_files.items()}
    if setting == "auto":
        fits = fit_prior_weights(
            base,
            [load_expert(prior_file), *experts.values()],
            data,
            batch_size=batch_size,
            max_length=max_length,
        )
        split = calibration_split(data)
        for culture, fit in sorted(fits.items()):
            print(
                f"{culture}: the prior's weight {fit.weight:g}, fitted on {fit.n} {split} records "
                f"(alignment {fit.expert:.4f} alone, {fit.mixed:.4f} mixed)",
                flush=True,
            )
        weights = {c: fits[c].weight if c in fits else 0.0 for c in experts}
        missing = sorted(c for c in experts if c not in fits)
        if missing:
            print(f"warning: no {split} records of {missing}: they answer alone", file=sys.stderr)
    else:
        weights = {c: float(setting or 0.0) for c in experts}
    for culture, expert in experts.items():
        save_expert(
            expert_files[culture], replace(expert, meta=replace(expert.meta, prior_weight=weights[culture]))
        )
    return weights


def calibrate_winners(
    config: ExperimentConfig,
    data: ExperimentData,
    winners: Mapping[str, Winner],
    load_base: Callable[[], FrozenBase],
) -> None:
    """Write the prior's weight (`shared.expert_prior_weight`) into each culture's winning expert file, before
    it is registered or published; nothing without the setting or without the prior among the winners."""
    setting = config.shared.expert_prior_weight
    files = {c: w.expert_file for c, w in winners.items() if not is_shared(c)}
    if setting is None or not files:
        return
    if SHARED not in winners:
        print("warning: no shared prior among the winners: the experts answer alone", file=sys.stderr)
        return
    calibrate_experts(
        load_base(),
        files,
        winners[SHARED].expert_file,
        data,
        setting,
        config.eval.batch_size,
        config.data.max_length,
    )
