"""Culture names: one key that folds spellings, one file-name slug, one resolver, and country canonicalisation.

Training names cultures by their canonical country name ("United Kingdom"); users, configs, model ids and
file names spell them in other ways ("uk", "GBR", "Britain", "united-kingdom"). Everything that compares or
resolves a culture name goes through this module, so every edge (config, CLI, HTTP) accepts the same
spellings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import pycountry

# The reserved culture name of the culture-blind shared survey prior: an expert, never a culture of the data.
SHARED = "shared"
# The reserved name of the plain base model, with no prompt: a committee member and a model id, not a culture.
BASE = "base"

__all__ = [
    "BASE",
    "SHARED",
    "CultureIndex",
    "UnknownCultureError",
    "canonical_country",
    "country_aliases",
    "culture_key",
    "find_culture",
    "is_shared",
    "resolve_culture",
    "sample_rank",
    "slug",
]


class UnknownCultureError(ValueError):
    """A culture name that matches none of the known cultures (or has no expert to answer for it)."""


def slug(culture: str) -> str:
    """A file-name-safe form of a culture name ("Côte d'Ivoire" -> "c-te-d-ivoire"): files, models, model ids."""
    return re.sub(r"[^a-z0-9]+", "-", culture.lower()).strip("-")


def culture_key(name: str) -> str:
    """A culture name folded so that `United Kingdom`, `united-kingdom` and `UNITED_KINGDOM` are one.

    It is the slug without its dashes, so a slug (a file name, a `shores:<slug>` model id) always has the key
    of the name it was made from.
    """
    return slug(name).replace("-", "")


def is_shared(name: str) -> bool:
    """Whether a name spells the reserved `shared` (the culture-blind shared prior), in any case or punctuation."""
    return culture_key(str(name)) == culture_key(SHARED)


# --------------------------------------------------------------------------------------------------------
# Countries
# --------------------------------------------------------------------------------------------------------

# Friendly short names, by alpha-2, that win over pycountry's names ("Russia", not "Russian Federation").
# XK (Kosovo) and XI (Northern Ireland) are user-assigned codes in common use; pycountry has neither.
_FRIENDLY: dict[str, str] = {
    "BA": "Bosnia and Herzegovina",
    "BN": "Brunei",
    "BO": "Bolivia",
    "CD": "DR Congo",
    "CI": "Côte d'Ivoire",
    "CV": "Cape Verde",
    "CZ": "Czechia",
    "FM": "Micronesia",
    "GB": "United Kingdom",
    "HK": "Hong Kong",
    "IR": "Iran",
    "KP": "North Korea",
    "KR": "South Korea",
    "LA": "Laos",
    "MD": "Moldova",
    "MK": "North Macedonia",
    "MO": "Macao",
    "PS": "Palestine",
    "RU": "Russia",
    "SY": "Syria",
    "TR": "Turkey",
    "TW": "Taiwan",
    "TZ": "Tanzania",
    "US": "United States",
    "VA": "Vatican City",
    "VE": "Venezuela",
    "VN": "Vietnam",
    "XI": "Northern Ireland",
    "XK": "Kosovo",
}

# Survey and everyday spellings pycountry does not resolve (or resolves wrongly); matched by culture_key,
# so case, spaces and punctuation aside ("S. Korea" is "s korea", "U.K." is "uk").
_ALIASES: dict[str, str] = {
    "britain": "GB",
    "great britain": "GB",
    "uk": "GB",
    "united kingdom": "GB",
    # Northern Ireland is surveyed separately (EVS) from Great Britain, so it stays its own culture rather
    # than folding into GB, where pycountry's fuzzy search would otherwise put it.
    "northern ireland": "XI",
    "s. korea": "KR",
    "south korea": "KR",
    "korea, south": "KR",
    "republic of korea": "KR",
    "n. korea": "KP",
    "north korea": "KP",
    "s. africa": "ZA",
    "czech rep.": "CZ",
    "czech republic": "CZ",
    "palest. ter.": "PS",
    "palestinian territories": "PS",
    "palestinian territory": "PS",
    "palestine": "PS",
    "ivory coast": "CI",
    "cote d'ivoire": "CI",
    "russia": "RU",
    "vietnam": "VN",
    "viet nam": "VN",
    "iran": "IR",
    "bolivia": "BO",
    "venezuela": "VE",
    "taiwan": "TW",
    "taiwan roc": "TW",
    "tanzania": "TZ",
    "syria": "SY",
    "macedonia": "MK",
    "north macedonia": "MK",
    "fyrom": "MK",
    "kosovo": "XK",
    "xk": "XK",
    "xi": "XI",
    "moldova": "MD",
    "laos": "LA",
    "turkey": "TR",
    "turkiye": "TR",
    "bosnia herzegovina": "BA",
    "bosnia": "BA",
    "hong kong sar": "HK",
    "macau": "MO",
    "macau sar": "MO",
    "macao sar": "MO",
    "usa": "US",
    "u.s.": "US",
    "america": "US",
    "united states of america": "US",
    "holland": "NL",
    "burma": "MM",
    "swaziland": "SZ",
    "cape verde": "CV",
    "east timor": "TL",
    "brunei": "BN",
    "micronesia": "FM",
    "vatican": "VA",
    "drc": "CD",
    "dr congo": "CD",
}
_ALIAS_ISO: dict[str, str] = {culture_key(spelling): iso for spelling, iso in _ALIASES.items()}

# Survey sample labels; the rank orders which sample wins when several map to one (culture, question).
_SAMPLE_SUFFIX = re.compile(
    r"\s*\(\s*(current national|old national|non-national|national)\s+sample\s*\)\s*$", re.I
)
_SAMPLE_RANK = {"": 0, "national": 0, "current national": 0, "old national": 1, "non-national": 2}


def _split_sample(name: str) -> tuple[str, int]:
    """Strip a survey-sample suffix from a country name and return (bare name, preference rank)."""
    match = _SAMPLE_SUFFIX.search(name)
    if not match:
        return name.strip(), 0
    return name[: match.start()].strip(), _SAMPLE_RANK[match.group(1).lower()]


def country_aliases() -> dict[str, str]:
    """The everyday and survey spellings of countries that pycountry lacks ("Britain", "Ivory Coast"), by ISO
    alpha-2; codes ("xk") left out, since they are no names a text would use."""
    return {name: iso for name, iso in _ALIASES.items() if len(culture_key(name)) > 2}


def sample_rank(name: str) -> int:
    """How much a country spelling's survey sample is preferred: 0 national, 1 old national, 2 non-national."""
    return _split_sample(name)[1]


def _friendly(iso: str) -> str:
    if iso in _FRIENDLY:
        return _FRIENDLY[iso]
    country = pycountry.countries.get(alpha_2=iso)
    if country is None:  # pragma: no cover - only reachable through a bad alias entry
        raise KeyError(iso)
    return getattr(country, "common_name", None) or country.name


def _words(text: str) -> str:
    # Whole-word matching of a name inside a country's names, so spaces are kept (unlike culture_key).
    return " ".join(text.replace("’", "'").lower().split())


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"  # what a regex's \w matches


def _phrases(words: str) -> set[str]:
    """The substrings of `words` that begin and end at word boundaries ("bolivia", "plurinational state of")."""
    starts = [i for i, c in enumerate(words) if not c.isspace() and (i == 0 or not _is_word(words[i - 1]))]
    ends = [
        j
        for j in range(1, len(words) + 1)
        if not words[j - 1].isspace() and (j == len(words) or not _is_word(words[j]))
    ]
    return {words[i:j] for i in starts for j in ends if j > i}


@lru_cache(maxsize=1)
def _country_phrases() -> dict[str, frozenset[str]]:
    """Every whole-word phrase of every country's own names, with the alpha-2 codes of the countries holding it.

    Built once (some 20 thousand phrases), so that fuzzy matching is one lookup whatever the name asked.
    """
    table: dict[str, set[str]] = {}
    for country in pycountry.countries:
        for attribute in ("name", "common_name", "official_name"):
            name = getattr(country, attribute, None)
            for phrase in _phrases(_words(name)) if name else ():
                table.setdefault(phrase, set()).add(country.alpha_2)
    return {phrase: frozenset(codes) for phrase, codes in table.items()}


def _fuzzy_iso(name: str) -> str | None:
    """The alpha-2 of the one country whose own names hold `name` as whole words, else None.

    Whole words of a country's own names only: not subdivisions ("Bavaria"), not word fragments ("Mars" is
    no Marshall Islands), and only when exactly one country qualifies ("Korea" names two).
    """
    codes = _country_phrases().get(_words(name), frozenset())
    return next(iter(codes)) if len(codes) == 1 else None


def _country(name: str) -> tuple[str, str] | None:
    """canonical_country without its cache: for names that callers choose (an HTTP request's culture)."""
    if not isinstance(name, str):
        return None
    bare, _ = _split_sample(name)
    if not bare or is_shared(bare):  # the shared prior's reserved name is never a country of the data
        return None
    iso = _ALIAS_ISO.get(culture_key(bare))
    if iso is None:
        try:
            iso = pycountry.countries.lookup(bare).alpha_2
        except LookupError:
            iso = _fuzzy_iso(bare)
    if iso is None:
        return None
    return _friendly(iso), iso


@lru_cache(maxsize=4096)
def canonical_country(name: str) -> tuple[str, str] | None:
    """Return (canonical short name, ISO 3166-1 alpha-2) for a country spelling, or None if unrecognised."""
    return _country(name)


# --------------------------------------------------------------------------------------------------------
# Resolving a user's spelling to a known culture
# --------------------------------------------------------------------------------------------------------


class CultureIndex:
    """Known cultures indexed once, so that finding the one a spelling means costs a few lookups.

    A server resolves every request's culture against the same known cultures: it builds the index when they
    change, and nothing about the names asked is kept.
    """

    def __init__(self, known: Iterable[str]):
        self.known = list(dict.fromkeys(known))
        self._names = set(self.known)
        self._by_key: dict[str, str] = {}
        self._by_iso: dict[str, str] = {}
        for culture in self.known:
            self._by_key.setdefault(culture_key(culture), culture)
        for culture in self.known:
            resolved = canonical_country(culture)
            if resolved is not None:
                self._by_iso.setdefault(resolved[1], culture)

    def exact(self, name: str) -> str | None:
        """The known culture with the same key as `name` (case, spaces and punctuation aside), or None."""
        wanted = culture_key(str(name))
        # A name with no ASCII letters or digits has an empty key, which must not match another.
        return self._by_key.get(wanted) if wanted else None

    def country(self, iso: str) -> str | None:
        """The known culture of a country, by its ISO 3166-1 alpha-2 code, or None."""
        return self._by_iso.get(iso)

    def find(self, name: str) -> str | None:
        """The known culture that `name` means, as `find_culture`, or None."""
        found = self.exact(name)
        if found is not None:
            return found
        resolved = _country(str(name))
        if resolved is None:
            return None
        if resolved[0] in self._names:
            return resolved[0]
        return self._by_iso.get(resolved[1])


def find_culture(name: str, known: Iterable[str]) -> str | None:
    """The culture in `known` that `name` means ("germany", "DE", "DEU", "Britain", "united-kingdom"), or None.

    The same key wins first; otherwise the same country, matched on its canonical name or, where `known`
    holds other spellings than ours (a config written by hand), on its ISO code.
    """
    return CultureIndex(known).find(name)


def resolve_culture(name: str, known: Iterable[str]) -> str:
    """The culture in `known` that `name` means, as find_culture; UnknownCultureError naming the known ones."""
    known_list = list(dict.fromkeys(known))
    found = find_culture(name, known_list)
    if found is None and is_shared(name):
        raise UnknownCultureError(
            f"{str(name)!r} is the reserved name of the culture-blind shared expert, not a culture"
        )
    if found is None:
        raise UnknownCultureError(f"unknown culture {str(name)!r}; known: {', '.join(sorted(known_list))}")
    return found
