"""The shared prior's weight in the committees of cultures without an expert, chosen on validation records.

A held-out culture is answered by the committee of its nearest experts. The same situation exists, and can
be measured without its answers, for every trained culture: answered by the committee of the *other*
experts (leave one culture out), on its validation records. The weight of the prior in those committees
that scores best there is the weight the held-out cultures' committees get (`serve.routing.prior_weight:
auto`). Test records are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orchestrator.config import ConfigError
from orchestrator.encoding import encode
from orchestrator.survey import ExperimentData, SurveyDataError
from workers.base_model import FrozenBase
from workers.committees import PRIOR_WEIGHTS, choose_prior_weight, culture_committee
from workers.cultures import UnknownCultureError, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH
from workers.expert_file import Expert
from workers.expert_store import Similarity
from workers.prompts import bank_from_experts
from workers.scoring import option_distributions

VALIDATION = "val"  # the only split the weight is chosen on


def fit_prior_weight(
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
    (each trained culture answered by its nearest other experts, mixed with the prior) on validation records.

    ConfigError without a shared prior among the experts; SurveyDataError without a trained culture that has
    validation records and a committee of other experts.
    """
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    prior = next((i for c, i in index.items() if is_shared(c)), None)
    if prior is None:
        raise ConfigError("serve.routing.prior_weight: auto needs the shared prior among the experts")
    own = [c for c in index if not is_shared(c)]
    committees = {}
    for culture in own:
        others = [c for c in own if c != culture]
        try:
            committees[culture] = culture_committee(culture, others, similarity, k, temperature)
        except UnknownCultureError:
            continue  # no similarity to any other expert: no held-out-like committee to measure
    records = [r for c, rs in data.records_of(VALIDATION, list(committees)).items() for r in rs]
    if not records:
        raise SurveyDataError(
            "serve.routing.prior_weight: auto found no validation records of a trained culture with a "
            "committee of other experts"
        )
    plain = encode(base, records, max_length)
    # One batched pass: per record, a row of the prior, then a row of each committee member.
    questions, expert_idx, starts = [], [], []
    for i, record in enumerate(records):
        members = [prior] + [index[m] for m in committees[record.culture].cultures]
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
