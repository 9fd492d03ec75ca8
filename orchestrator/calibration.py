"""The shared prior's weights: each expert's share of it, and its share in the committees, fitted on records
unlike the training data.

An expert fitted to ~50 questions of one survey can learn that survey's questions rather than its culture,
and then answers another survey's questions worse than the culture-blind prior. So an expert answers as
(1 - w) expert + w prior, its distributions mixed. Its w (`ExpertMeta.prior_weight`) is the weight of
PRIOR_WEIGHTS whose mixture scores best on its culture's records of the calibration split: `transfer_val`,
the held-out programme's questions, with `data.transfer`; else `val`.

A culture without an expert is answered by the committee of its nearest experts, and the prior joins that
committee with the weight written in the prior's own file. That weight is chosen the same way, for every
trained culture answered by the committee of the *other* experts (leave one culture out).

Test and transfer_test are never read: `calibration_split` is the only split these functions score.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from orchestrator.config import ExperimentConfig
from orchestrator.encoding import encode
from orchestrator.results import Winner
from orchestrator.survey import ExperimentData, SurveyDataError, similarity_table
from workers.base_model import FrozenBase
from workers.committees import (
    PRIOR_WEIGHTS,
    choose_prior_weight,
    culture_committee,
    mixture_scores,
    with_member_priors,
)
from workers.cultures import SHARED, UnknownCultureError, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH
from workers.expert_file import Expert, load_expert, save_expert
from workers.expert_store import Similarity
from workers.prompts import bank_from_experts
from workers.scoring import option_distributions


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


def choose_weights(
    rows: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    grid: Sequence[float] = PRIOR_WEIGHTS,
) -> dict[str, PriorWeightFit]:
    """Each culture's weight of `grid` whose mixtures score best on its own records; ties go to the smaller
    weight (the expert's own answer). With 1 in the grid, no culture scores below the prior on these records.

    Chosen over one weight for all cultures and over a culture's curve averaged with the pooled one, by 2-fold
    cross-fitting on the demo's transfer_val (docs/results.md).
    """
    out = {}
    for culture, culture_rows in rows.items():
        scores = mixture_scores(culture_rows, grid)
        best = int(np.argmax(scores))  # argmax: the first (smallest) of equal bests
        out[culture] = PriorWeightFit(
            float(grid[best]), len(culture_rows), float(scores[0]), float(scores[best])
        )
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


def fit_committee_prior_weight(
    base: FrozenBase,
    experts: list[Expert],
    data: ExperimentData,
    similarity: Similarity,
    k: int,
    temperature: float,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    grid: Sequence[float] = PRIOR_WEIGHTS,
) -> float:
    """The prior's weight in `grid` that maximises the mean alignment of leave-one-culture-out committees
    (each trained culture answered by its nearest other experts as served, mixed with the prior) on the
    calibration split.

    ValueError without the shared prior among the experts; SurveyDataError without a trained culture that
    has calibration records and a committee of other experts.
    """
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    if SHARED not in index:
        raise ValueError("fitting the committees' prior weight needs the shared prior among the experts")
    own = [c for c in index if not is_shared(c)]
    served = {e.meta.culture: e.meta.prior_weight for e in experts if not is_shared(e.meta.culture)}
    committees = {}
    for culture in own:
        others = [c for c in own if c != culture]
        try:
            committee = culture_committee(culture, others, similarity, k, temperature)
        except UnknownCultureError:
            continue  # no similarity to any other expert: no held-out-like committee to measure
        committees[culture] = with_member_priors(committee, served)
    split = calibration_split(data)
    records = [r for rs in data.records_of(split, list(committees)).values() for r in rs]
    if not records:
        raise SurveyDataError(f"no {split} records of a trained culture with a committee of other experts")
    plain = encode(base, records, max_length)
    # One batched pass: per record, a row of the prior, then a row of each committee member.
    questions, expert_idx, starts = [], [], []
    for i, record in enumerate(records):
        members = [index[SHARED]] + [index[m] for m in committees[record.culture].cultures]
        starts.append(len(questions))
        questions += [plain[i]] * len(members)
        expert_idx += members
    dists = option_distributions(
        base, bank_from_experts(experts, base.device), questions, expert_idx, batch_size
    )
    rows = []
    for record, start in zip(records, starts):
        weights = [w for _, w in committees[record.culture].members]
        mix = sum(w * dists[start + 1 + j] for j, w in enumerate(weights))
        rows.append((mix, dists[start], np.asarray(record.distribution)))
    return choose_prior_weight(rows, grid)


def calibrate_experts(
    base: FrozenBase,
    expert_files: Mapping[str, Path],
    prior_file: Path,
    data: ExperimentData,
    setting: float | str,
    k: int,
    temperature: float,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> dict[str, float]:
    """Write the prior's weights into the files (`shared.expert_prior_weight`): each culture's expert's, and the
    committees' into the prior's own file. `auto` fits them; a number sets them all. Returns them by culture
    (the committees' under the prior's name)."""
    experts = {c: load_expert(path) for c, path in expert_files.items()}
    prior = load_expert(prior_file)
    split = calibration_split(data)
    if setting == "auto":
        fits = fit_prior_weights(
            base, [prior, *experts.values()], data, batch_size=batch_size, max_length=max_length
        )
        for culture, fit in sorted(fits.items()):
            print(
                f"{culture}: the prior's weight {fit.weight:g}, fitted on {fit.n} {split} records "
                f"(alignment {fit.expert:.4f} alone, {fit.mixed:.4f} mixed)",
                flush=True,
            )
        missing = sorted(c for c in experts if c not in fits)
        if missing:
            print(f"warning: no {split} records of {missing}: they answer alone", file=sys.stderr)
        weights = {c: fits[c].weight if c in fits else 0.0 for c in experts}
    else:
        weights = {c: float(setting) for c in experts}
    calibrated = {c: replace(e, meta=replace(e.meta, prior_weight=weights[c])) for c, e in experts.items()}
    committee = float(setting) if setting != "auto" else 0.0
    if setting == "auto":
        similarity = similarity_table(data.records, list(experts), list(experts))
        try:
            committee = fit_committee_prior_weight(
                base, [prior, *calibrated.values()], data, similarity, k, temperature, batch_size, max_length
            )
            print(f"committees: the prior's weight {committee:g}, fitted leave one culture out on {split}")
        except SurveyDataError as err:
            print(f"warning: committees without the prior: {err}", file=sys.stderr)
    for culture, expert in calibrated.items():
        save_expert(expert_files[culture], expert)
    save_expert(prior_file, replace(prior, meta=replace(prior.meta, prior_weight=committee)))
    return weights | {SHARED: committee}


def calibrate_winners(
    config: ExperimentConfig,
    data: ExperimentData,
    winners: Mapping[str, Winner],
    load_base: Callable[[], FrozenBase],
) -> None:
    """Write the prior's weights (`shared.expert_prior_weight`) into the winning experts' files and the prior's,
    before they are registered or published; nothing without the setting or without the prior among them."""
    setting = config.shared.expert_prior_weight
    files = {c: w.expert_file for c, w in winners.items() if not is_shared(c)}
    if setting is None or not files:
        return
    if SHARED not in winners:
        print("warning: no shared prior among the winners: the experts answer alone", file=sys.stderr)
        return
    routing = config.serve.routing
    calibrate_experts(
        load_base(),
        files,
        winners[SHARED].expert_file,
        data,
        setting,
        routing.committee_size,
        routing.routing_temperature,
        config.eval.batch_size,
        config.data.max_length,
    )
