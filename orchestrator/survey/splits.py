"""Train/val/test splits by question: deterministic from a hash of the normalised text, the same for every country."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Literal

from orchestrator.survey.records import SurveyDataError, SurveyRecord, normalise_question
from workers.defaults import SPLIT_FRACTIONS

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values) or sum(values) <= 0:
        raise SurveyDataError(
            f"split fractions must be three non-negative numbers with a positive sum, got {fractions!r}"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def question_split(
    question: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS, salt: str = ""
) -> Split:
    """Assign a question to train/val/test from a sha256 of salt + its normalised text (stable everywhere)."""
    train, val, _ = _check_fractions(fractions)
    digest = hashlib.sha256((salt + normalise_question(question)).encode("utf-8")).digest()
    # 64 bits of the digest as a uniform draw in [0, 1); Python's hash() is salted per process, sha256 is not.
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def split_records(
    records: Iterable[SurveyRecord], fractions: tuple[float, float, float] = SPLIT_FRACTIONS, salt: str = ""
) -> dict[str, list[SurveyRecord]]:
    """Split records by question so that every culture's answers to one question land in the same split."""
    _check_fractions(fractions)
    out: dict[str, list[SurveyRecord]] = {s: [] for s in SPLITS}
    cache: dict[str, Split] = {}
    for record in records:
        key = normalise_question(record.question)
        if key not in cache:
            cache[key] = question_split(key, fractions, salt)
        out[cache[key]].append(record)
    return out
