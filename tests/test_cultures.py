"""Culture names (workers.cultures): the key, the slug, the resolver, and country canonicalisation."""

from __future__ import annotations

import json

import pytest

from tests.conftest import OPINIONS
from workers.cultures import (
    CultureIndex,
    UnknownCultureError,
    canonical_country,
    culture_key,
    find_culture,
    is_shared,
    resolve_culture,
    slug,
)

needs_data = pytest.mark.skipif(not OPINIONS.exists(), reason=f"shared survey data not at {OPINIONS}")

# ---------------------------------------------------------------------------------------------------------
# Country names
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("Britain", ("United Kingdom", "GB")),
        ("Great Britain", ("United Kingdom", "GB")),
        ("S. Korea", ("South Korea", "KR")),
        ("South Korea", ("South Korea", "KR")),
        ("S. Africa", ("South Africa", "ZA")),
        ("S. Africa (Non-national sample)", ("South Africa", "ZA")),
        ("Czech Rep.", ("Czechia", "CZ")),
        ("Palest. ter.", ("Palestine", "PS")),
        ("Ivory Coast (Non-national sample)", ("Côte d'Ivoire", "CI")),
        ("Russia", ("Russia", "RU")),
        ("Russian Federation", ("Russia", "RU")),
        ("Vietnam", ("Vietnam", "VN")),
        ("Iran", ("Iran", "IR")),
        ("Bolivia (Non-national sample)", ("Bolivia", "BO")),
        ("Venezuela", ("Venezuela", "VE")),
        ("Taiwan ROC", ("Taiwan", "TW")),
        ("Tanzania", ("Tanzania", "TZ")),
        ("Syria", ("Syria", "SY")),
        ("Moldova", ("Moldova", "MD")),
        ("Macedonia", ("North Macedonia", "MK")),
        ("North Macedonia", ("North Macedonia", "MK")),
        ("Kosovo", ("Kosovo", "XK")),
        ("Turkey", ("Turkey", "TR")),
        ("Bosnia Herzegovina", ("Bosnia and Herzegovina", "BA")),
        ("Hong Kong SAR", ("Hong Kong", "HK")),
        ("Macau SAR", ("Macao", "MO")),
        ("Northern Ireland", ("Northern Ireland", "XI")),
        ("India (Current national sample)", ("India", "IN")),
        ("India (Old national sample)", ("India", "IN")),
        ("United States", ("United States", "US")),
        ("germany", ("Germany", "DE")),
    ],
)
def test_canonical_country(spelling, expected):
    assert canonical_country(spelling) == expected


@pytest.mark.parametrize("spelling", ["Atlantis", "", "   ", "Korea", "(Non-national sample)"])
def test_canonical_country_unknown(spelling):
    assert canonical_country(spelling) is None


@needs_data
def test_every_spelling_in_shared_data_resolves():
    spellings = {json.loads(line)["country"] for line in OPINIONS.read_text(encoding="utf-8").splitlines()}
    assert [s for s in sorted(spellings) if canonical_country(s) is None] == []


KNOWN = ["Germany", "United Kingdom", "United States", "South Korea", "Russia", "Côte d'Ivoire"]


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("de", "Germany"),
        ("DE", "Germany"),
        ("DEU", "Germany"),
        ("germany", "Germany"),
        (" Germany ", "Germany"),
        ("Britain", "United Kingdom"),
        ("UK", "United Kingdom"),
        ("gb", "United Kingdom"),
        ("USA", "United States"),
        ("S. Korea", "South Korea"),
        ("kor", "South Korea"),
        ("Russian Federation", "Russia"),
        ("ivory coast", "Côte d'Ivoire"),
    ],
)
def test_resolve_culture(spelling, expected):
    assert resolve_culture(spelling, KNOWN) == expected


def test_resolve_culture_matches_other_spellings_in_known():
    assert resolve_culture("United Kingdom", ["Britain", "Japan"]) == "Britain"


@pytest.mark.parametrize("spelling", ["Narnia", "France", ""])
def test_resolve_culture_unknown(spelling):
    with pytest.raises(UnknownCultureError) as err:
        resolve_culture(spelling, KNOWN)
    message = str(err.value)
    assert message.startswith(f"unknown culture '{spelling}'; known: ")
    assert message.endswith(", ".join(sorted(KNOWN)))


def test_punctuation_and_spacing_variants_resolve_to_one_country():
    for spelling in ("U.K.", "u k", "United-Kingdom", "S Korea", "Czech Rep", "Bosnia-Herzegovina"):
        assert canonical_country(spelling) is not None, spelling
    assert canonical_country("U.K.") == canonical_country("uk") == ("United Kingdom", "GB")


# ---------------------------------------------------------------------------------------------------------
# Key and slug
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("United Kingdom", "united-kingdom"), ("Côte d'Ivoire", "c-te-d-ivoire"), (" DR Congo ", "dr-congo")],
)
def test_slug_is_file_name_safe_and_has_the_key_of_its_name(name, expected):
    assert slug(name) == expected
    assert culture_key(slug(name)) == culture_key(name)  # so a `shores:<slug>` model id finds its culture


def test_spellings_that_differ_in_case_spaces_and_punctuation_share_a_key():
    assert len({culture_key(n) for n in ("United Kingdom", "united-kingdom", "UNITED_KINGDOM")}) == 1
    assert culture_key("Germany") != culture_key("Japan")


# ---------------------------------------------------------------------------------------------------------
# Resolving against known cultures: optional and raising forms
# ---------------------------------------------------------------------------------------------------------


def test_find_culture_matches_key_then_country_and_is_none_otherwise():
    assert find_culture("UNITED_KINGDOM", KNOWN) == "United Kingdom"
    assert find_culture("c-te-d-ivoire", KNOWN) == "Côte d'Ivoire"  # a slug back to its culture
    assert find_culture("GBR", KNOWN) == "United Kingdom"
    assert find_culture("France", KNOWN) is None and find_culture("Narnia", KNOWN) is None
    assert find_culture("", KNOWN) is None and find_culture("日本", ["中国"]) is None


def test_resolve_culture_raises_what_find_culture_returns_none_for():
    for spelling in ("UK", "deu", "Korea, South"):
        assert resolve_culture(spelling, KNOWN) == find_culture(spelling, KNOWN)
    with pytest.raises(UnknownCultureError):
        resolve_culture("Atlantis", KNOWN)


def test_the_shared_priors_reserved_name_is_never_a_culture():
    assert is_shared("shared") and is_shared(" SHARED ") and not is_shared("Shared Island")
    # A data file cannot name a culture `shared` (its records count as unknown_country) ...
    assert canonical_country("shared") is None and canonical_country("Shared (national sample)") is None
    # ... and a config or user naming it is told why, not just that it is unknown.
    with pytest.raises(UnknownCultureError, match="'Shared' is the reserved name of the culture-blind"):
        resolve_culture("Shared", KNOWN)
    assert resolve_culture("shared", [*KNOWN, "shared"]) == "shared"  # the expert itself, by its own name


def test_an_index_finds_what_find_culture_finds_with_lookups_only(monkeypatch):
    import pycountry

    def no_scan(*_):
        raise AssertionError("fuzzy matching must not scan every country and subdivision")

    monkeypatch.setattr(pycountry.countries, "search_fuzzy", no_scan)
    index = CultureIndex(KNOWN)
    spellings = [
        "UNITED_KINGDOM",
        "c-te-d-ivoire",
        "GBR",
        "UK",
        "deu",
        "Korea, South",
        "France",
        "Narnia",
        "",
    ]
    spellings += ["x" * 100, "Tanzania, United Republic of", "Plurinational State"]
    for spelling in spellings:
        assert index.find(spelling) == find_culture(spelling, KNOWN), spelling
    assert index.exact("united kingdom") == "United Kingdom" and index.exact("UK") is None  # keys only
    # A whole-word phrase of one country's names finds it; one that names two countries finds none.
    assert canonical_country("Plurinational State") == ("Bolivia", "BO")
    assert canonical_country("Korea") is None and canonical_country("North") is None
