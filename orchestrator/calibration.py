"""The shared prior's weights: each expert's share of it, and its share in the committees, fitted on
validation records.

An expert fitted to ~50 questions of one survey can learn that survey's questions rather than its culture,
and then answers another survey's questions worse than the culture-blind prior. So an expert answers as
(1 - w) expert + w prior, its distributions mixed. Its w (`ExpertMeta.prior_weight`) is the weight of
PRIOR_WEIGHTS whose mixture scores best on its culture's `val` records.

With a transfer split (`data.transfer`) an expert gets a second weight, for questions whose answer formats are
unlike the training data's: fitted the same way on `transfer_val`, the held-out programme's questions, and
kept in its `FormatGate` with the familiarity that tells `val` from `transfer_val` (`workers/answer_formats.py`).

A culture without an expert is answered by the committee of its nearest experts, and the prior joins that
committee with the weight written in the prior's own file. That weight is chosen on the calibration split
(`transfer_val`, else `val`) for every trained culture answered by the committee of the *other* experts
(leave one culture out).

Test and transfer_test are never read: `fit_prior_weights` refuses them.
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
from workers.answer_formats import (
    FormatGate,
    familiarity,
    prior_weights,
    separating_threshold,
    training_grams,
)
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


def fit_format_gate(data: ExperimentData, cultures: list[str]) -> FormatGate | None:
    """The answer formats of the training split's questions, and the familiarity that best tells the
    cultures' `val` records (like them) from their `transfer_val` records (another programme's); None
    without records on both sides."""
    grams = training_grams(r.options for r in data.splits["train"])
    scores = {
        split: [familiarity(r.options, grams) for rs in data.records_of(split, cultures).values() for r in rs]
        for split in ("val", "transfer_val")
    }
    if not scores["val"] or not scores["transfer_val"]:
        return None
    return FormatGate(grams, separating_threshold(scores["val"], scores["transfer_val"]), 0.0)


def fit_prior_weights(
    base: FrozenBase,
    experts: list[Expert],
    data: ExperimentData,
    grid: Sequence[float] = PRIOR_WEIGHTS,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    split: str | None = None,
) -> dict[str, PriorWeightFit]:
    """Each culture's expert's weight of the prior, fitted on its records of `split` (default: the
    calibration split).

    `experts` must hold the shared prior; a culture without records there gets no fit (its expert answers
    alone).
    """
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    if SHARED not in index:
        raise ValueError("fitting the prior's weights needs the shared prior among the experts")
    if split in ("test", "transfer_test"):
        raise ValueError(f"the prior's weights are never fitted on {split}")
    cultures = [c for c in index if not is_shared(c)]
    split = split or calibration_split(data)
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
    metas = [e.meta for e in experts if not is_shared(e.meta.culture)]
    committees = {}
    for culture in own:
        others = [c for c in own if c != culture]
        try:
            committees[culture] = culture_committee(culture, others, similarity, k, temperature)
        except UnknownCultureError:
            continue  # no similarity to any other expert: no held-out-like committee to measure
    split = calibration_split(data)
    records = [r for rs in data.records_of(split, list(committees)).values() for r in rs]
    if not records:
        raise SurveyDataError(f"no {split} records of a trained culture with a committee of other experts")
    plain = encode(base, records, max_length)
    # One batched pass: per record, a row of the prior, then a row of each member as served on its options.
    questions, expert_idx, served = [], [], []
    for i, record in enumerate(records):
        committee = with_member_priors(committees[record.culture], prior_weights(metas, record.options))
        members = [SHARED] + committee.cultures
        served.append((len(questions), committee))
        questions += [plain[i]] * len(members)
        expert_idx += [index[m] for m in members]
    dists = option_distributions(
        base, bank_from_experts(experts, base.device), questions, expert_idx, batch_size
    )
    rows = []
    for record, (start, committee) in zip(records, served):
        mix = sum(w * dists[start + 1 + j] for j, (_, w) in enumerate(committee.members))
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

        def fitted(on: str) -> dict[str, float]:
            fits = fit_prior_weights(
                base, [prior, *experts.values()], data, batch_size=batch_size, max_length=max_length, split=on
            )
            for culture, fit in sorted(fits.items()):
                print(
                    f"{culture}: the prior's weight {fit.weight:g}, fitted on {fit.n} {on} records "
                    f"(alignment {fit.expert:.4f} alone, {fit.mixed:.4f} mixed)",
                    flush=True,
                )
            missing = sorted(c for c in experts if c not in fits)
            if missing:
                print(f"warning: no {on} records of {missing}: they answer alone there", file=sys.stderr)
            return {c: fits[c].weight if c in fits else 0.0 for c in experts}

        familiar = fitted("val")
        gates: dict[str, FormatGate | None] = dict.fromkeys(experts)
        # A transfer split: a second weight, for questions whose answer formats are unlike the training data.
        gate = fit_format_gate(data, list(experts)) if split != "val" else None
        if gate is not None:
            print(
                f"format gate: familiar from {gate.threshold:.3f} of {len(gate.grams)} training option words "
                f"and pairs (val against {split})"
            )
            gates = {c: replace(gate, unfamiliar_weight=w) for c, w in fitted(split).items()}
        elif split != "val":
            print(f"warning: no format gate without val and {split} records", file=sys.stderr)
        calibrated = {
            c: replace(e, meta=replace(e.meta, prior_weight=familiar[c], format_gate=gates[c]))
            for c, e in experts.items()
        }
    else:
        calibrated = {
            c: replace(e, meta=replace(e.meta, prior_weight=float(setting), format_gate=None))
            for c, e in experts.items()
        }
    weights = {c: e.meta.prior_weight for c, e in calibrated.items()}
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
