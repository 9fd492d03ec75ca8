"""Renderings: one survey question written the ways questionnaires write it, and asked the way a chat asks it.

The same question reaches a user with or without its missing-value options ("Don't know", "No answer",
"DK/Refused"), in another option order, and with a scale's points as labels or as numbers. An answer that
changes with the rendering was learned from the format, not the culture. So evaluation reports every rendering
(and counts the worst), calibration fits on them, and training draws one at random each epoch.

`chat` keeps the options as written but asks as a chat user does: the question is the user's message and the
answer is the assistant's first token, with no "Answer:" of ours before it (`workers/scoring.py`). That is what
`/v1/chat/completions` serves, so the chat path gets what the opinion path has.

A `Rendering` keeps, for each option it shows, the index of the original option. That maps the survey's
shares into the rendering (`target`) and the model's answer back to the original options (`back`) exactly.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AS_WRITTEN = "as_written"
NO_MISSING = "no_missing"
REVERSED = "reversed"
NUMBERED_SCALE = "numbered_scale"
CHAT = "chat"
# Every rendering an evaluation reports; each leaves a question it does not apply to as written.
RENDERINGS: tuple[str, ...] = (AS_WRITTEN, NO_MISSING, REVERSED, NUMBERED_SCALE, CHAT)

# A missing-value code of any programme: the option's start, lowercased, apostrophes straightened.
_MISSING = re.compile(
    r"^(dk\b|don't know|do not know|refused|no answer|no response|not asked|not applicable"
    r"|can't (say|choose)|(other )?missing\b|don't -\d)"
)
_NUMBER = re.compile(r"^\s*(\d+)(\.0+)?\s*$")
_LEADING_NUMBER = re.compile(r"^\s*\d+\b")


def _folded(option: str) -> str:
    return " ".join(str(option).replace("\u2019", "'").lower().split())


def is_missing_code(option: str) -> bool:
    """Whether an option records no answer ("Don't know", "No answer", "DK/Refused", "Missing; ...")."""
    return bool(_MISSING.match(_folded(option)))


@dataclass(frozen=True)
class Rendering:
    """A question's options as one rendering shows them: `source[j]` is the original index of option j."""

    name: str
    options: tuple[str, ...]
    source: tuple[int, ...]

    def target(self, distribution: Sequence[float]) -> np.ndarray:
        """The survey's shares over this rendering's options, renormalised (dropped options leave)."""
        shares = np.asarray(distribution, float)[list(self.source)]
        return shares / shares.sum()

    def back(self, answer: Sequence[float], n_original: int) -> np.ndarray:
        """An answer over this rendering's options as a distribution over the original ones (0 where dropped)."""
        out = np.zeros(n_original)
        out[list(self.source)] = answer
        return out

    def then(self, other: Rendering) -> Rendering:
        """This rendering followed by `other` (applied to this one's options)."""
        name = other.name if self.name == AS_WRITTEN else f"{self.name}+{other.name}"
        return Rendering(name, other.options, tuple(self.source[j] for j in other.source))


def as_written(options: Sequence[str]) -> Rendering:
    return Rendering(AS_WRITTEN, tuple(options), tuple(range(len(options))))


def reversed_order(options: Sequence[str]) -> Rendering:
    """The options in reverse order: a scale read from its other end."""
    n = len(options)
    return Rendering(REVERSED, tuple(reversed(options)), tuple(range(n - 1, -1, -1)))


def without_missing(options: Sequence[str]) -> Rendering | None:
    """The substantive options alone; None when there is no code to drop or fewer than two would stay."""
    keep = [i for i, o in enumerate(options) if not is_missing_code(o)]
    if len(keep) == len(options) or len(keep) < 2:
        return None
    return Rendering(NO_MISSING, tuple(options[i] for i in keep), tuple(keep))


def numbered_scale(options: Sequence[str]) -> Rendering | None:
    """A scale with numbered points written as numbers throughout, its labelled ends as "1 = label".

    A scale is a run of at least three options numbered one apart ("2", ..., "9", or "1.0", ..., "9.0"), up or
    down; a label right beside the run is its next point. None for options without such a run.
    """
    numbers = [_number(o) for o in options]
    runs = _numbered_runs(numbers)
    if not runs:
        return None
    start, end = max(runs, key=lambda r: r[1] - r[0])
    step = numbers[start + 1] - numbers[start]
    shown = list(map(str, options))
    for i in range(start, end):
        shown[i] = str(numbers[i])
    for i, point in ((start - 1, numbers[start] - step), (end, numbers[end - 1] + step)):
        if 0 <= i < len(options) and numbers[i] is None and not is_missing_code(options[i]):
            if not _LEADING_NUMBER.match(shown[i]):
                shown[i] = f"{point} = {shown[i]}"
    if shown == list(options):
        return None
    return Rendering(NUMBERED_SCALE, tuple(shown), tuple(range(len(options))))


def _number(option: str) -> int | None:
    match = _NUMBER.match(str(option))
    return int(match.group(1)) if match else None


def _numbered_runs(numbers: Sequence[int | None]) -> list[tuple[int, int]]:
    """[start, end) of each run of at least three numbers one apart, all up or all down."""
    runs, start = [], 0
    while start < len(numbers):
        end = start + 1
        if numbers[start] is not None:
            while (
                end < len(numbers)
                and numbers[end] is not None
                and abs(numbers[end] - numbers[end - 1]) == 1
                and (
                    end - start < 2 or numbers[end] - numbers[end - 1] == numbers[start + 1] - numbers[start]
                )
            ):
                end += 1
        if end - start >= 3:
            runs.append((start, end))
        start = end
    return runs


def renderings(options: Sequence[str]) -> dict[str, Rendering]:
    """Each rendering of RENDERINGS that changes these options, and `as_written` always."""
    found = {AS_WRITTEN: as_written(options), REVERSED: reversed_order(options)}
    for name, make in ((NO_MISSING, without_missing), (NUMBERED_SCALE, numbered_scale)):
        rendering = make(options)
        if rendering is not None:
            found[name] = rendering
    if len(options) < 2:
        del found[REVERSED]
    return found


def rendering(options: Sequence[str], name: str) -> Rendering:
    """One rendering of RENDERINGS; a question it does not change stays as written (`chat`'s options do)."""
    if name not in RENDERINGS:
        raise ValueError(f"unknown rendering {name!r}; known: {', '.join(RENDERINGS)}")
    return renderings(options).get(name, as_written(options))


def asked_in_chat(name: str) -> bool:
    """Whether a rendering asks as a chat does: the answer opens the assistant's turn (`CHAT`)."""
    return name == CHAT


def training_renderings(options: Sequence[str]) -> list[Rendering]:
    """Every combination of the renderings that apply (codes dropped or not, scale numbered or not, either
    order), as written first: a draw among them is a fair coin for each."""
    steps = [[None, make(options)] for make in (without_missing, numbered_scale) if make(options) is not None]
    out, seen = [], set()
    for choice in itertools.product(*steps) if steps else [()]:
        current = as_written(options)
        for step in choice:
            if step is not None:
                current = current.then(_applied(step.name, current.options))
        for r in (current, current.then(reversed_order(current.options))):
            if r.options not in seen:
                seen.add(r.options)
                out.append(r)
    return out


def _applied(name: str, options: Sequence[str]) -> Rendering:
    make = {NO_MISSING: without_missing, NUMBERED_SCALE: numbered_scale}[name]
    return make(options) or as_written(options)
