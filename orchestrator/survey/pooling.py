"""The shared prior's data: every question's answer distribution pooled over all the countries that answered it."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from orchestrator.survey.records import SurveyRecord, normalise_question
from workers.cultures import SHARED


def pooled_records(records: Iterable[SurveyRecord]) -> list[SurveyRecord]:
    """One culture-blind record per question (and option list): the mean of its countries' distributions.

    The mean weighs every country alike, whatever its population: the prior learns how people answer a
    question across the survey, and each culture's expert learns how its own people differ. One row a
    question, not one a country, makes the prior as cheap to train as ~15 countries' experts.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[SurveyRecord]] = defaultdict(list)
    for record in records:
        groups[(normalise_question(record.question), record.options)].append(record)
    pooled = []
    for answers in groups.values():
        mean = np.mean([r.distribution for r in answers], axis=0)
        pooled.append(
            SurveyRecord(SHARED, "", answers[0].question, answers[0].options, tuple(float(x) for x in mean))
        )
    return pooled


def sample_questions(records: list[SurveyRecord], limit: int | None) -> list[SurveyRecord]:
    """At most `limit` records, chosen by a hash of the question: the same ones on every run and machine."""
    if limit is None or len(records) <= limit:
        return records

    def rank(record: SurveyRecord) -> bytes:
        return hashlib.sha256(
            normalise_question(record.question).encode() + repr(record.options).encode()
        ).digest()

    keep = set(map(id, sorted(records, key=rank)[:limit]))
    return [r for r in records if id(r) in keep]
