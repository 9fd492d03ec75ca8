"""A survey record, the error every survey step raises, and a question's identity across files and countries."""

from __future__ import annotations

from dataclasses import dataclass


class SurveyDataError(ValueError):
    """A user-facing, one-line error about survey data: which file (or culture) and what is wrong."""


@dataclass(frozen=True)
class SurveyRecord:
    """One culture's answer distribution over one question's options."""

    culture: str
    iso: str
    question: str
    options: tuple[str, ...]
    distribution: tuple[float, ...]


def normalise_question(text: str) -> str:
    """Lowercase, collapse runs of whitespace to one space and strip, so trivially different texts match."""
    return " ".join(text.lower().split())
