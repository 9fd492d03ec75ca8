"""The shared prior's weights: each expert's share of it, and its share in the committees, fitted on every
rendering of the validation records.

An expert fitted to ~50 questions of one survey can learn how that survey writes its questions rather than its
culture, and then answers a questionnaire written another way worse than the culture-blind prior. So an expert
answers as (1 - w) expert + w prior, its distributions mixed. Its w (`ExpertMeta.prior_weight`) is the weight of
PRIOR_WEIGHTS whose mixture's worst rendering scores best on its culture's `val` records: each record written
each way of RENDERINGS (missing-value codes dropped, options reversed, a scale's points numbered;
`workers/renderings.py`), the mean alignment per rendering, the lowest of those. A w that helps on questions as
written but harms once their codes are dropped is not chosen; and since the weight is one number per expert,
nothing about how a question is written changes it.

A culture without an expert is answered by the committee of its nearest experts, each answering with its own
share of the prior: the one mechanism guards both. (The prior's own file holds a further share for those
committees: 0 with `auto`, the number otherwise.)

Only `val` is read: test and the transfer split are for reporting.
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
from orchestrator.survey import ExperimentData, SurveyRecord
from workers.base_model import FrozenBase
from workers.committees import (
    PRIOR_WEIGHTS,
    worst_rendering_scores,
)
from workers.cultures import SHARED, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH
from workers.expert_file import Expert, load_expert, save_expert
from workers.prompts import bank_from_experts
from workers.renderings import RENDERINGS
from workers.scoring import EncodedQuestion, option_distributions

CALIBRATION_SPLIT = "val"
# In an expert's training metadata once its prior weight is written: the `shared.expert_prior_weight` it followed.
CALIBRATED = "prior_weight_setting"
Rows = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (answer, prior, survey) a record


@dataclass(frozen=True)
class PriorWeightFit:
    """One culture's fitted weight, the records it was fitted on, and their worst rendering's mean alignment
    at w = 0 and at w."""

    weight: float
    n: int
    expert: float
    mixed: float


def choose_weights(
    rows: Mapping[str, Mapping[str, Rows]], grid: Sequence[float] = PRIOR_WEIGHTS
) -> dict[str, PriorWeightFit]:
    """Each culture's weight of `grid` whose worst rendering scores best on its own records (rows by culture,
    then by rendering); ties go to the smaller weight (the expert's own answer). With 1 in the grid, no
    culture scores below the prior on any rendering of these records."""
    out = {}
    for culture, by_rendering in rows.items():
        scores = worst_rendering_scores(by_rendering, grid)
        best = int(np.argmax(scores))  # argmax: the first (smallest) of equal bests
        n = len(next(iter(by_rendering.values())))
        out[culture] = PriorWeightFit(float(grid[best]), n, float(scores[0]), float(scores[best]))
    return out


def rendered_answers(
    base: FrozenBase,
    experts: list[Expert],
    records: list[SurveyRecord],
    members: Callable[[SurveyRecord], Sequence[str]],
    batch_size: int,
    max_length: int,
) -> dict[str, list[tuple[EncodedQuestion, list[np.ndarray]]]]:
    """Per rendering, each record encoded that way and the answers of the experts `members(record)` names, in
    one batched pass (a row asked twice, e.g. a rendering that leaves a question as written, runs once)."""
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    encoded = {name: encode(base, records, max_length, shown=name) for name in RENDERINGS}
    questions, expert_idx = [], []
    for shown in encoded.values():
        for q, record in zip(shown, records):
            names = members(record)
            questions += [q] * len(names)
            expert_idx += [index[m] for m in names]
    dists = iter(
        option_distributions(base, bank_from_experts(experts, base.device), questions, expert_idx, batch_size)
    )
    return {
        name: [(q, [next(dists) for _ in members(record)]) for q, record in zip(shown, records)]
        for name, shown in encoded.items()
    }


def fit_prior_weights(
    base: FrozenBase,
    experts: list[Expert],
    data: ExperimentData,
    grid: Sequence[float] = PRIOR_WEIGHTS,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> dict[str, PriorWeightFit]:
    """Each culture's expert's weight of the prior, fitted on every rendering of its `val` records.

    `experts` must hold the shared prior; a culture without val records gets no fit (its expert answers alone).
    """
    cultures = [e.meta.culture for e in experts if not is_shared(e.meta.culture)]
    if len(cultures) == len(experts):
        raise ValueError("fitting the prior's weights needs the shared prior among the experts")
    records = [r for rs in data.records_of(CALIBRATION_SPLIT, cultures).values() for r in rs]
    if not records:
        return {}
    answers = rendered_answers(base, experts, records, lambda r: (r.culture, SHARED), batch_size, max_length)
    rows: dict[str, dict[str, Rows]] = defaultdict(lambda: defaultdict(list))
    for name, shown in answers.items():
        for record, (q, (expert, prior)) in zip(records, shown):
            rows[record.culture][name].append((expert, prior, np.asarray(q.target)))
    return choose_weights(rows, grid)


def calibrate_experts(
    base: FrozenBase,
    expert_files: Mapping[str, Path],
    prior_file: Path,
    data: ExperimentData,
    setting: float | str,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> dict[str, float]:
    """Write the prior's weights into the files (`shared.expert_prior_weight`): each culture's expert's, and the
    committees' into the prior's own file. `auto` fits the experts' (the committees' is 0: their members answer
    with their own shares); a number sets them all. Returns them by culture (the committees' under the prior's
    name)."""
    experts = {c: load_expert(path) for c, path in expert_files.items()}
    prior = load_expert(prior_file)
    weights = dict.fromkeys(experts, 0.0 if setting == "auto" else float(setting))
    committee = 0.0 if setting == "auto" else float(setting)
    if setting == "auto":
        fits = fit_prior_weights(
            base, [prior, *experts.values()], data, batch_size=batch_size, max_length=max_length
        )
        for culture, fit in sorted(fits.items()):
            weights[culture] = fit.weight
            print(
                f"{culture}: the prior's weight {fit.weight:g}, fitted on {fit.n} {CALIBRATION_SPLIT} records in "
                f"{len(RENDERINGS)} renderings (worst rendering {fit.expert:.4f} alone, {fit.mixed:.4f} mixed)",
                flush=True,
            )
        missing = sorted(c for c in experts if c not in fits)
        if missing:
            print(f"warning: no {CALIBRATION_SPLIT} records of {missing}: they answer alone", file=sys.stderr)
    for culture, expert in experts.items():
        save_expert(expert_files[culture], _calibrated(expert, weights[culture], setting))
    save_expert(prior_file, _calibrated(prior, committee, setting))
    return weights | {SHARED: committee}


def calibrate_winners(
    config: ExperimentConfig,
    data: ExperimentData,
    winners: Mapping[str, Winner],
    load_base: Callable[[], FrozenBase],
) -> None:
    """Write the prior's weights (`shared.expert_prior_weight`) into the winning experts' files and the prior's,
    before they are registered or published; nothing without the setting or without the prior among them.
    Nothing when every file holds them already (`uncalibrated`): calibrating again changes nothing."""
    setting = config.shared.expert_prior_weight
    if setting is None or all(is_shared(c) for c in winners):
        return
    if SHARED not in winners:
        print("warning: no shared prior among the winners: the experts answer alone", file=sys.stderr)
        return
    if not uncalibrated(config, winners):
        return
    # All of them again, not only the pending: the prior's own share is fitted over the whole set.
    files = {c: w.expert_file for c, w in winners.items() if not is_shared(c)}
    calibrate_experts(
        load_base(),
        files,
        winners[SHARED].expert_file,
        data,
        setting,
        config.eval.batch_size,
        config.data.max_length,
    )


def uncalibrated(config: ExperimentConfig, winners: Mapping[str, Winner]) -> list[str]:
    """The winners (the prior among them) whose files do not hold the prior's weights of the config's
    `shared.expert_prior_weight` yet; none without the setting or without the prior among the winners."""
    setting = config.shared.expert_prior_weight
    if setting is None or SHARED not in winners or all(is_shared(c) for c in winners):
        return []
    return sorted(
        c for c, w in winners.items() if load_expert(w.expert_file).meta.training.get(CALIBRATED) != setting
    )


def _calibrated(expert: Expert, weight: float, setting: float | str) -> Expert:
    """An expert with its prior weight written, and the setting it followed marked in its training metadata."""
    meta = replace(expert.meta, prior_weight=weight, training=expert.meta.training | {CALIBRATED: setting})
    return replace(expert, meta=meta)
