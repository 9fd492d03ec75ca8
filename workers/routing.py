"""Why a query reaches its committee: the culture a request names, or the one its text points to.

The router tries, in order: the request's `culture` (by name); a place, nationality, region or city the text
names (`workers/places.py`); the text's language; and only when none of these reaches a known culture, the
sentence embedding of the text against the experts' descriptors (`TextRouter`). A culture found by name or
in the text is answered as an explicit `culture` is: its expert, or its survey-similarity committee.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from workers.committees import Committee
from workers.cultures import CultureIndex
from workers.places import PlaceIndex

# How a request was routed, as the `routing.method` of a response says.
BY_CULTURE = "culture"  # the request named its culture
BY_PLACE = "place"  # the text names a country, nationality, region or city of a known culture
BY_LANGUAGE = "language"  # the text names no place; its language is spoken most in a known culture
BY_EMBEDDING = "embedding"  # nothing found: the text's sentence embedding against the experts' descriptors


@dataclass
class Routing:
    """What a response says of its routing: the culture found (None when the embedding chose), the evidence
    read from the request, and the method."""

    found: str | None
    evidence: list[str] = field(default_factory=list)
    method: str = BY_EMBEDDING

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Routed:
    """A request's committee, the model id that names it (`shores:<culture>`, `shores:auto`) and why."""

    committee: Committee
    model: str
    routing: Routing


def named(culture: str, asked: str) -> Routing:
    """The routing of a request that names its culture (`asked`, resolved to `culture`)."""
    return Routing(culture, [f'culture "{asked}"'], BY_CULTURE)


def read_text(text: str, places: PlaceIndex, names: CultureIndex) -> Routing:
    """The known culture a text points to: the first of its named countries (strongest evidence first) that is
    a known culture, else the language's, with the mentions that point to it; `found` None (method embedding)
    when none is, with everything read."""
    found = places.find(text)
    method = BY_LANGUAGE if found.language is not None else BY_PLACE
    for iso in found.ranked():
        culture = names.country(iso)
        if culture is not None:
            return Routing(culture, found.evidence(iso), method)
    return Routing(None, found.evidence(), BY_EMBEDDING)
