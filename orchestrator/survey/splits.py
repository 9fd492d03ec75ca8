"""Train/val/test splits by question: deterministic from a hash of the normalised text, the same for every country.

A transfer split (`Transfer`) takes every question of one survey programme out of train/val/test and splits
those questions, by another hash of their text, into `transfer_val` and `transfer_test`: experts trained and
chosen on the other programme's questions are reported on questions coded unlike anything they saw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.survey.programmes import PROGRAMMES, question_programmes
from orchestrator.survey.records import SurveyDataError, SurveyRecord, normalise_question
from workers.defaults import SPLIT_FRACTIONS

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
TRANSFER_SPLITS: tuple[str, ...] = ("transfer_val", "transfer_test")
TRANSFER_SALT = "transfer:"  # before the split's salt: the transfer halves are a draw of their own


@dataclass(frozen=True)
class Transfer:
    """One programme's questions held out of train/val/test; `val` of them go to transfer_val, the rest to
    transfer_test."""

    hold_out: str
    val: float = 0.5

    def __post_init__(self) -> None:
        if self.hold_out not in PROGRAMMES:
            raise SurveyDataError(
                f"transfer hold_out must be one of {', '.join(PROGRAMMES)}, got {self.hold_out!r}"
            )
        if not 0 < self.val < 1:
            raise SurveyDataError(f"transfer val share must lie between 0 and 1, got {self.val!r}")

    def key(self) -> str:
        """The transfer as text, e.g. `wvs:0.5` (in a data fingerprint)."""
        return f"{self.hold_out}:{self.val!r}"

    @classmethod
    def parse(cls, text: str) -> Transfer | None:
        """The transfer `key` wrote, or None for "" (no transfer split)."""
        if not text:
            return None
        hold_out, _, val = text.partition(":")
        return cls(hold_out, float(val))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values) or sum(values) <= 0:
        raise SurveyDataError(
            f"split fractions must be three non-negative numbers with a positive sum, got {fractions!r}"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def _draw(question: str, salt: str) -> float:
    """A uniform draw in [0, 1) from a sha256 of salt + the normalised question (stable everywhere)."""
    digest = hashlib.sha256((salt + normalise_question(question)).encode("utf-8")).digest()
    # 64 bits of the digest; Python's hash() is salted per process, sha256 is not.
    return int.from_bytes(digest[:8], "big") / 2.0**64


def question_split(
    question: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS, salt: str = ""
) -> Split:
    """Assign a question to train/val/test from a sha256 of salt + its normalised text (stable everywhere)."""
    train, val, _ = _check_fractions(fractions)
    u = _draw(question, salt)
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def transfer_half(question: str, transfer: Transfer, salt: str = "") -> str:
    """Assign a held-out programme's question to transfer_val or transfer_test."""
    return "transfer_val" if _draw(question, TRANSFER_SALT + salt) < transfer.val else "transfer_test"


def split_records(
    records: Iterable[SurveyRecord],
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
    salt: str = "",
    transfer: Transfer | None = None,
) -> dict[str, list[SurveyRecord]]:
    """Split records by question so that every culture's answers to one question land in the same split.

    With a transfer, the held-out programme's questions (`question_programmes` of these records) go to
    transfer_val and transfer_test instead, and the other questions to train/val/test as without one.
    """
    _check_fractions(fractions)
    records = list(records)
    held = set()
    if transfer is not None:
        held = {q for q, p in question_programmes(records).items() if p == transfer.hold_out}
    out: dict[str, list[SurveyRecord]] = {s: [] for s in SPLITS + (TRANSFER_SPLITS if transfer else ())}
    cache: dict[str, str] = {}
    for record in records:
        key = normalise_question(record.question)
        if key not in cache:
            in_transfer = key in held
            cache[key] = (
                transfer_half(key, transfer, salt) if in_transfer else question_split(key, fractions, salt)
            )
        out[cache[key]].append(record)
    return out
