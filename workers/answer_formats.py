"""Answer formats an expert knows: a question's options are familiar when their words and word pairs were seen
among the options of the questions the expert was trained on.

An expert fitted to one survey learns that survey's answer formats along with its culture. On a question whose
options are unlike them (another survey's 10-point scale, its missing-answer codes) it can answer worse than
the culture-blind prior. So an expert with a `FormatGate` takes one share of the prior on familiar questions
(`ExpertMeta.prior_weight`, fitted on `val`) and another on unfamiliar ones (`FormatGate.unfamiliar_weight`,
fitted on the held-out programme's `transfer_val`); the threshold is the familiarity that best tells those two
splits apart (`orchestrator/calibration.py`). Chosen over one weight for all questions in docs/results.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

_WORD = re.compile(r"[a-z0-9]+")


def option_grams(options: Sequence[str]) -> set[str]:
    """The words of a question's options, in order, and each pair of adjacent words."""
    words = _WORD.findall(" ".join(options).lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def familiarity(options: Sequence[str], known: Set[str]) -> float:
    """The share of the options' words and word pairs among `known`: 1 for options seen in training."""
    grams = option_grams(options)
    return len(grams & known) / len(grams) if grams else 0.0


def separating_threshold(familiar: Sequence[float], unfamiliar: Sequence[float]) -> float:
    """The familiarity that best tells two sets of questions apart: the fewest of `familiar` below it plus
    the fewest of `unfamiliar` at or above it, each counted as a share of its set; ties go to the lowest."""
    if not familiar or not unfamiliar:
        raise ValueError("a threshold needs familiar and unfamiliar questions")

    def errors(t: float) -> float:
        return sum(x < t for x in familiar) / len(familiar) + sum(x >= t for x in unfamiliar) / len(
            unfamiliar
        )

    return min(sorted({*familiar, *unfamiliar}), key=errors)


@dataclass(frozen=True)
class FormatGate:
    """The answer formats an expert was trained on, the familiarity from which a question counts as one of
    them, and the expert's share of the prior on the questions that do not."""

    grams: frozenset[str]
    threshold: float
    unfamiliar_weight: float

    def familiar(self, options: Sequence[str] | None) -> bool:
        """Whether a question with these options is like the training data; a question without options
        (free text) is not, so it gets the weight fitted on another survey's questions."""
        return bool(options) and familiarity(options, self.grams) >= self.threshold

    def to_json(self) -> dict:
        return {
            "grams": sorted(self.grams),
            "threshold": self.threshold,
            "unfamiliar_weight": self.unfamiliar_weight,
        }

    @classmethod
    def from_json(cls, values: dict) -> FormatGate:
        return cls(frozenset(values["grams"]), float(values["threshold"]), float(values["unfamiliar_weight"]))


def served_prior_weight(prior_weight: float, gate: FormatGate | None, options: Sequence[str] | None) -> float:
    """An expert's share of the prior on a question with these options (None: free text): `prior_weight`
    without a gate or on a familiar question, else the gate's `unfamiliar_weight`."""
    return prior_weight if gate is None or gate.familiar(options) else gate.unfamiliar_weight


class Served(Protocol):
    """An expert as a committee uses it: `ExpertMeta`, or serving's `ExpertCard`."""

    culture: str
    prior_weight: float
    format_gate: FormatGate | None


def prior_weights(experts: Iterable[Served], options: Sequence[str] | None) -> dict[str, float]:
    """Each expert's share of the prior on a question with these options (None: free text), those above 0;
    the prior's own file holds the committees' share."""
    weights = {e.culture: served_prior_weight(e.prior_weight, e.format_gate, options) for e in experts}
    return {c: w for c, w in weights.items() if w}


def training_grams(option_lists: Iterable[Sequence[str]]) -> frozenset[str]:
    """The words and word pairs of every training question's options."""
    out: set[str] = set()
    for options in option_lists:
        out |= option_grams(options)
    return frozenset(out)
