"""Survey similarity between cultures: mean 1 - Jensen-Shannon distance over the questions both answered."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from orchestrator.survey.records import SurveyRecord, normalise_question
from workers.cultures import resolve_culture


def _by_culture(records: Iterable[SurveyRecord]) -> dict[str, dict[str, SurveyRecord]]:
    table: dict[str, dict[str, SurveyRecord]] = defaultdict(dict)
    for record in records:
        table[record.culture].setdefault(normalise_question(record.question), record)
    return table


def _similarity(a: dict[str, SurveyRecord], b: dict[str, SurveyRecord]) -> float | None:
    # Imported here, not at the top: workers.scoring pulls in torch and transformers, which loading data and
    # validating a CLI's arguments should not have to wait for.
    from workers.scoring import alignment

    scores = []
    for key in a.keys() & b.keys():
        ra, rb = a[key], b[key]
        # One question can be coded with different option sets in different waves (e.g. with or without
        # "DK/Refused"); distributions over different options are not comparable, so such pairs are left out.
        if ra.options != rb.options:
            continue
        scores.append(float(alignment(np.asarray(ra.distribution), np.asarray(rb.distribution))))
    # fsum: the same mean whichever way round the pair is taken, and whatever order the set yields its keys.
    return math.fsum(scores) / len(scores) if scores else None


def similarity_table(
    records: Iterable[SurveyRecord],
    cultures: Iterable[str] | None = None,
    others: Iterable[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Each culture's similarity to each of `others` (None: every culture in the records), itself excepted.

    The records are indexed once and each unordered pair is scored once; pairs with no comparable question
    are left out of their rows.
    """
    table = _by_culture(records)
    known = list(table)
    rows = known if cultures is None else [resolve_culture(c, known) for c in cultures]
    columns = known if others is None else [resolve_culture(c, known) for c in others]
    pairs: dict[tuple[str, str], float | None] = {}
    out: dict[str, dict[str, float]] = {}
    for culture in dict.fromkeys(rows):
        out[culture] = {}
        for other in dict.fromkeys(columns):
            if other == culture:
                continue
            pair = (culture, other) if culture <= other else (other, culture)
            if pair not in pairs:
                pairs[pair] = _similarity(table[pair[0]], table[pair[1]])
            if pairs[pair] is not None:
                out[culture][other] = pairs[pair]
    return out


def culture_similarity(records: Iterable[SurveyRecord], a: str, b: str) -> float | None:
    """Mean of 1 - Jensen-Shannon distance (base 2) over questions both cultures answered; None if none."""
    table = _by_culture(records)
    known = list(table)
    ca, cb = resolve_culture(a, known), resolve_culture(b, known)
    return _similarity(table[ca], table[cb])


def nearest_cultures(
    records: Iterable[SurveyRecord], culture: str, candidates: Iterable[str] | None, k: int
) -> list[tuple[str, float]]:
    """Return up to k (culture, similarity) pairs most similar to `culture`, best first (candidates None: all)."""
    (row,) = similarity_table(records, [culture], candidates).values()
    return sorted(row.items(), key=lambda item: (-item[1], item[0]))[: max(k, 0)]
