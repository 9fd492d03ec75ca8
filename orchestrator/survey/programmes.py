"""The survey programme of a question, read from how its options code a missing answer.

GlobalOpinionQA mixes items of two programmes whose coding differs. Pew Global Attitudes items end in
"DK/Refused" (a few in "Don't know/Refused"). World Values Survey / EVS items carry the WVS missing codes:
"Don't know", "No answer" (or "No answer/refused"), and "Missing; ..." or "Other missing; ..." such as
"Other missing; Multiple answers Mail (EVS)". A question with neither coding, or (none in our file) with
both, is `unknown`. Options are compared lowercased, with runs of whitespace collapsed and curly
apostrophes straightened, so "Don't Know" and "Don’t know" are the WVS code too.

A question's programme is read from every option set it has in a file, so all its records share one label
(the splits are by question, and one question must never land on two sides).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Literal

from orchestrator.survey.records import SurveyRecord, normalise_question

Programme = Literal["pew", "wvs", "unknown"]
PROGRAMMES: tuple[str, ...] = ("pew", "wvs")  # the programmes a transfer split can hold out

PEW_CODES = frozenset({"dk/refused", "don't know/refused"})
WVS_CODES = frozenset({"don't know", "no answer"})
WVS_PREFIXES = ("no answer/", "missing", "other missing")


def _folded(option: str) -> str:
    return " ".join(option.replace("\u2019", "'").lower().split())


def _codings(options: Iterable[str]) -> set[str]:
    """Which programmes' missing codes the options carry ("pew", "wvs", both or neither)."""
    found = set()
    for option in map(_folded, options):
        if option in PEW_CODES:
            found.add("pew")
        elif option in WVS_CODES or option.startswith(WVS_PREFIXES):
            found.add("wvs")
    return found


def options_programme(options: Iterable[str]) -> Programme:
    """The programme whose missing codes the options carry; `unknown` for neither or both."""
    found = _codings(options)
    return found.pop() if len(found) == 1 else "unknown"


def question_programmes(records: Iterable[SurveyRecord]) -> dict[str, Programme]:
    """Each question's programme (by normalised text), from the options of all its records together."""
    options: dict[str, set[str]] = defaultdict(set)
    for record in records:
        options[normalise_question(record.question)].update(record.options)
    return {question: options_programme(opts) for question, opts in options.items()}


def programme_counts(records: Iterable[SurveyRecord]) -> Counter[str]:
    """Distinct questions per programme (`pew`, `wvs`, `unknown`)."""
    return Counter(question_programmes(records).values())
