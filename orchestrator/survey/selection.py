"""Which cultures to train on (named, or the top N by distinct questions) and which to hold out."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchestrator.survey.records import SurveyDataError, SurveyRecord, normalise_question
from workers.cultures import find_culture, resolve_culture


@dataclass
class CultureSelection:
    """Cultures chosen for training, cultures held out, and distinct-question counts for every culture."""

    trained: list[str]
    held_out: list[str]
    counts: dict[str, int]


def _question_counts(records: Iterable[SurveyRecord]) -> dict[str, int]:
    questions: dict[str, set[str]] = defaultdict(set)
    for record in records:
        questions[record.culture].add(normalise_question(record.question))
    return {c: len(q) for c, q in sorted(questions.items(), key=lambda item: (-len(item[1]), item[0]))}


def select_cultures(
    records: Iterable[SurveyRecord],
    cultures: list[str] | None = None,
    top: int | None = None,
    min_questions: int = 0,
    held_out: Sequence[str] = (),
) -> CultureSelection:
    """Choose the cultures to train on and those held out.

    Named cultures, or the `top` N by distinct questions, or (neither given) every culture with at least
    `min_questions` questions.
    """
    counts = _question_counts(records)
    if cultures is not None and top is not None:
        raise SurveyDataError("give at most one of cultures or top to choose the cultures to train on")
    known = list(counts)
    held = list(dict.fromkeys(resolve_culture(name, known) for name in held_out))

    if cultures is not None:
        trained = list(dict.fromkeys(resolve_culture(name, known) for name in cultures))
        if not trained:
            raise SurveyDataError("cultures is empty; name at least one culture to train on")
        clash = [c for c in trained if c in held]
        if clash:
            raise SurveyDataError(f"culture {clash[0]!r} is both trained and held out")
        thin = [c for c in trained if counts[c] < min_questions]
        if thin:
            c = thin[0]
            raise SurveyDataError(
                f"culture {c!r} has {counts[c]} questions, fewer than min_questions {min_questions}"
            )
        return CultureSelection(trained=trained, held_out=held, counts=counts)

    if top is None:
        eligible = [c for c, n in counts.items() if n >= min_questions and c not in held]
        if not eligible:
            raise SurveyDataError(f"no culture has at least {min_questions} questions (data.min_questions)")
        return CultureSelection(trained=eligible, held_out=held, counts=counts)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SurveyDataError(f"top must be a positive integer, got {top!r}")
    # `counts` is already ordered by (-count, name), which is exactly the ranking and tie-break wanted.
    eligible = [c for c, n in counts.items() if n >= min_questions and c not in held]
    if len(eligible) < top:
        raise SurveyDataError(
            f"only {len(eligible)} cultures have at least {min_questions} questions"
            f"{' (not counting held-out ones)' if held else ''}, fewer than top {top}"
        )
    return CultureSelection(trained=eligible[:top], held_out=held, counts=counts)


def present_cultures(
    records: Iterable[SurveyRecord], experts: Sequence[str], held_out: Sequence[str], source: str
) -> tuple[CultureSelection, list[str]]:
    """The experts' cultures and the held-out ones that a survey file (not the one trained on) holds.

    Returns the selection and one-line notes: cultures it lacks (skipped) and cultures it holds that have
    neither an expert nor a place among the held-out ones (not evaluated). A file with none of either is an
    error: there would be nothing to evaluate.
    """
    counts = _question_counts(records)
    known = list(counts)
    found = {name: find_culture(name, known) for name in dict.fromkeys([*experts, *held_out])}
    trained = [found[c] for c in dict.fromkeys(experts) if found[c]]
    # A held-out culture that has an expert by now is evaluated as the expert's.
    held = [found[c] for c in dict.fromkeys(held_out) if found[c] and found[c] not in trained]
    if not trained and not held:
        raise SurveyDataError(
            f"{source} holds no records of the experts' cultures ({', '.join(experts)})"
            + (f" or the held-out ones ({', '.join(held_out)})" if held_out else "")
        )
    notes = []
    missing = [f"{c} ({'expert' if c in experts else 'held out'})" for c, f in found.items() if f is None]
    if missing:
        notes.append(f"no records in {source} for {', '.join(missing)}: skipped")
    others = [c for c in known if c not in trained and c not in held]
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        notes.append(f"not evaluated (in {source}, but no expert and not held out): {shown}")
    return CultureSelection(trained=trained, held_out=held, counts=counts), notes
