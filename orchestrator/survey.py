"""Load survey opinion distributions (GlobalOpinionQA and its flattened forms) into clean per-culture records.

The loader accepts the flattened JSONL/JSON form (one record per country and question), the original
GlobalOpinionQA CSV (one row per question, a Python-literal dict of country -> shares), or the dataset on the
Hugging Face Hub. Bad records are skipped and counted rather than fatal, so one odd row in a user's file does
not stop a run, while the report still says exactly what was dropped and why.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycountry

__all__ = [
    "HF_DATASET",
    "HF_FILENAME",
    "SKIP_REASONS",
    "CultureSelection",
    "LoadReport",
    "SurveyDataError",
    "SurveyRecord",
    "canonical_country",
    "culture_similarity",
    "load_survey",
    "lookup_culture",
    "nearest_cultures",
    "normalise_question",
    "question_split",
    "select_cultures",
    "split_records",
]

HF_DATASET = "Anthropic/llm_global_opinions"
HF_FILENAME = "data/global_opinions.csv"

# Each skipped record is counted under the first reason in this order that applies to it.
SKIP_REASONS: tuple[str, ...] = (
    "malformed",
    "unknown_country",
    "too_few_options",
    "length_mismatch",
    "nan_or_negative",
    "zero_sum",
    "duplicate",
)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


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


@dataclass
class LoadReport:
    """What a load saw, kept and skipped (reason -> count, only reasons that occurred)."""

    path: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=Counter)

    def summary(self) -> str:
        """Return a one-line account, e.g. 'read 3880 records, kept 3871, skipped 9 (zero_sum 9)'."""
        total = sum(self.skipped.values())
        line = f"read {self.read} records, kept {self.kept}, skipped {total}"
        if total:
            line += f" ({_format_skips(self.skipped)})"
        return line


@dataclass
class CultureSelection:
    """Cultures chosen for training, cultures held out, and distinct-question counts for every culture."""

    trained: list[str]
    held_out: list[str]
    counts: dict[str, int]


def _format_skips(skipped: dict[str, int]) -> str:
    # Fixed reason order keeps the line stable across runs, whatever order the skips happened in.
    known = [r for r in SKIP_REASONS if skipped.get(r)]
    other = sorted(r for r in skipped if r not in SKIP_REASONS and skipped[r])
    return ", ".join(f"{r} {skipped[r]}" for r in known + other)


def _one_line(text: object) -> str:
    # Exception texts from json/ast/the hub can span lines; the CLI prints our messages as a single line.
    return " ".join(str(text).split())


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

# Survey and everyday spellings pycountry does not resolve (or resolves wrongly), keyed by _name_key.
_ALIASES: dict[str, str] = {
    "britain": "GB",
    "great britain": "GB",
    "uk": "GB",
    "u.k.": "GB",
    "united kingdom": "GB",
    # Northern Ireland is surveyed separately (EVS) from Great Britain, so it stays its own culture rather
    # than folding into GB, where pycountry's fuzzy search would otherwise put it.
    "northern ireland": "XI",
    "s. korea": "KR",
    "s korea": "KR",
    "south korea": "KR",
    "korea, south": "KR",
    "republic of korea": "KR",
    "n. korea": "KP",
    "north korea": "KP",
    "s. africa": "ZA",
    "s africa": "ZA",
    "czech rep.": "CZ",
    "czech rep": "CZ",
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
    "u.s.a.": "US",
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


def _name_key(name: str) -> str:
    return " ".join(name.replace("’", "'").lower().split())


def _friendly(iso: str) -> str:
    if iso in _FRIENDLY:
        return _FRIENDLY[iso]
    country = pycountry.countries.get(alpha_2=iso)
    if country is None:  # pragma: no cover - only reachable through a bad alias entry
        raise KeyError(iso)
    return getattr(country, "common_name", None) or country.name


def _fuzzy_iso(name: str) -> str | None:
    """Return the alpha-2 of the one country whose own names contain `name` as whole words, else None."""
    try:
        hits = pycountry.countries.search_fuzzy(name)
    except LookupError:
        return None
    # search_fuzzy also matches subdivisions ("Hong Kong SAR" -> China, "Bavaria" -> Germany) and word
    # fragments ("Mars" -> Marshall Islands); only whole words of the country's own names are trusted, and
    # only when exactly one country qualifies ("Korea" names two).
    word = re.compile(rf"(?<!\w){re.escape(_name_key(name))}(?!\w)")
    own = []
    for country in hits:
        names = [getattr(country, a, None) for a in ("name", "common_name", "official_name")]
        if any(n and word.search(_name_key(n)) for n in names):
            own.append(country.alpha_2)
    return own[0] if len(set(own)) == 1 else None


@lru_cache(maxsize=4096)
def canonical_country(name: str) -> tuple[str, str] | None:
    """Return (canonical short name, ISO 3166-1 alpha-2) for a country spelling, or None if unrecognised."""
    if not isinstance(name, str):
        return None
    bare, _ = _split_sample(name)
    key = _name_key(bare)
    if not key:
        return None
    iso = _ALIASES.get(key)
    if iso is None:
        try:
            iso = pycountry.countries.lookup(bare).alpha_2
        except LookupError:
            iso = _fuzzy_iso(bare)
    if iso is None:
        return None
    return _friendly(iso), iso


def lookup_culture(name: str, known: Iterable[str]) -> str:
    """Map a user's spelling ("germany", "DE", "DEU", "Britain", "UK") to the matching name in `known`."""
    known_list = list(dict.fromkeys(known))
    key = _name_key(str(name))
    for culture in known_list:
        if _name_key(culture) == key:
            return culture
    resolved = canonical_country(str(name)) if key else None
    if resolved is not None:
        if resolved[0] in known_list:
            return resolved[0]
        # `known` may hold other spellings than ours (e.g. a config written by hand): match on the ISO code.
        for culture in known_list:
            other = canonical_country(culture)
            if other is not None and other[1] == resolved[1]:
                return culture
    raise SurveyDataError(f"unknown culture {str(name)!r}; known: {', '.join(sorted(known_list))}")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """One record as read from a file, before any validation."""

    country: Any
    question: Any
    options: Any
    distribution: Any


def _option_label(option: Any) -> str | None:
    """Return an option's text, or None if it is not text or a number."""
    if isinstance(option, str):
        return option
    # GlobalOpinionQA writes the middle points of 1-10 scales as floats (1.0, 2.0, ...) next to text labels;
    # "1" is what a respondent saw, so integral numbers become integer text.
    if isinstance(option, int | float) and not isinstance(option, bool) and math.isfinite(option):
        return str(int(option)) if float(option).is_integer() else str(option)
    return None


def _validate(raw: _Raw | None) -> tuple[str, SurveyRecord | None, int]:
    """Check one raw record; return (skip reason or "", the clean record, sample rank)."""
    if raw is None:
        return "malformed", None, 0
    country, question, options, distribution = raw.country, raw.question, raw.options, raw.distribution
    if not isinstance(country, str) or not isinstance(question, str) or not question.strip():
        return "malformed", None, 0
    if not isinstance(options, list | tuple) or not isinstance(distribution, list | tuple):
        return "malformed", None, 0
    labels = [_option_label(o) for o in options]
    if any(label is None for label in labels):
        return "malformed", None, 0
    # bool is an int subclass, but a True share is a data error, not a count of 1.
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in distribution):
        return "malformed", None, 0
    resolved = canonical_country(country)
    if resolved is None:
        return "unknown_country", None, 0
    if len(options) < 2:
        return "too_few_options", None, 0
    if len(options) != len(distribution):
        return "length_mismatch", None, 0
    shares = [float(v) for v in distribution]
    if any(not math.isfinite(v) or v < 0 for v in shares):
        return "nan_or_negative", None, 0
    total = math.fsum(shares)
    if total <= 0:
        return "zero_sum", None, 0
    _, rank = _split_sample(country)
    record = SurveyRecord(
        culture=resolved[0],
        iso=resolved[1],
        question=question,
        options=tuple(labels),
        distribution=tuple(v / total for v in shares),
    )
    return "", record, rank


def _raw_from_obj(obj: Any) -> _Raw | None:
    if not isinstance(obj, dict):
        return None
    try:
        return _Raw(obj["country"], obj["question"], obj["options"], obj["distribution"])
    except KeyError:
        return None


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise SurveyDataError(
            f"{path}: not UTF-8 text ({_one_line(exc.reason)} at byte {exc.start})"
        ) from exc
    except OSError as exc:
        raise SurveyDataError(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from exc


def _iter_jsonl(path: Path) -> Iterator[_Raw | None]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SurveyDataError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from exc
        yield _raw_from_obj(obj)


def _iter_json(path: Path) -> Iterator[_Raw | None]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise SurveyDataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise SurveyDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for obj in data:
        yield _raw_from_obj(obj)


_DEFAULTDICT = re.compile(r"^\s*defaultdict\(\s*<class\s+'[A-Za-z_]+'>\s*,\s*(.*)\)\s*$", re.S)


def _literal(text: str) -> Any:
    """Parse the text of a Python literal (never eval); a `defaultdict(<class 'list'>, {...})` wrapper is dropped."""
    match = _DEFAULTDICT.match(text)
    return ast.literal_eval(match.group(1) if match else text.strip())


def _iter_csv(path: Path) -> Iterator[_Raw | None]:
    text = _read_text(path, encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines(keepends=True))
    missing = [c for c in ("question", "selections", "options") if c not in (reader.fieldnames or [])]
    if missing:
        raise SurveyDataError(
            f"{path}: not a GlobalOpinionQA CSV (missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; expected question, selections, options, source)"
        )
    try:
        for row in reader:
            question = row.get("question")
            try:
                selections = _literal(row.get("selections") or "")
                options = _literal(row.get("options") or "")
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                # An unparseable row is one malformed record: its countries cannot be known.
                yield None
                continue
            if not isinstance(selections, dict):
                yield None
                continue
            for country, distribution in selections.items():
                yield _Raw(country, question, options, distribution)
    except csv.Error as exc:
        raise SurveyDataError(f"{path}: line {reader.line_num}: bad CSV ({_one_line(exc)})") from exc


def _hf_target(source: str | Path) -> tuple[str, str] | None:
    """Return (repo id, filename) if `source` names a Hub dataset rather than a local file."""
    if isinstance(source, Path):
        return None
    text = source.strip()
    if text.startswith("hf://"):
        parts = text[len("hf://") :].strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise SurveyDataError(f"{source}: expected hf://owner/dataset[/file.csv]")
        return "/".join(parts[:2]), "/".join(parts[2:]) or HF_FILENAME
    if text.lower() == HF_DATASET.lower() and not Path(text).exists():
        return HF_DATASET, HF_FILENAME
    return None


def _hf_download(repo_id: str, filename: str) -> Path:
    label = f"hf://{repo_id}/{filename}"
    advice = "pass a local file instead (.jsonl, .json or the GlobalOpinionQA .csv)"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise SurveyDataError(f"{label}: huggingface_hub is not installed; {advice}") from exc
    # huggingface_hub reads HF_HUB_OFFLINE once at import; reading it here honours a change made since.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        local = hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=offline)
    except Exception as exc:  # the hub raises many types (HTTP, connection, cache, auth); all mean "not here"
        why = "offline mode (HF_HUB_OFFLINE=1) and no cached copy" if offline else type(exc).__name__
        raise SurveyDataError(
            f"{label}: the Hugging Face Hub could not be reached ({why}: {_one_line(exc)[:200]}); {advice}"
        ) from exc
    return Path(local)


def load_survey(source: str | Path) -> tuple[list[SurveyRecord], LoadReport]:
    """Load, validate, de-duplicate and renormalise survey records from a file or the Hugging Face Hub."""
    hf = _hf_target(source)
    if hf is not None:
        path = _hf_download(*hf)
        label = f"hf://{hf[0]}/{hf[1]}"
        reader = _iter_csv
    else:
        path = Path(source).expanduser()
        label = str(source)
        if not path.exists():
            raise SurveyDataError(f"{path}: no such file")
        if path.is_dir():
            raise SurveyDataError(f"{path}: is a directory, expected a .jsonl, .json or .csv file")
        readers = {".jsonl": _iter_jsonl, ".ndjson": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv}
        suffix = path.suffix.lower()
        if suffix not in readers:
            raise SurveyDataError(
                f"{path}: unknown format {suffix or '(no extension)'!r}; expected .jsonl, .json or .csv"
            )
        reader = readers[suffix]

    report = LoadReport(path=label)
    skipped: Counter[str] = Counter()
    kept: list[SurveyRecord] = []
    # (culture, question, options) -> (slot in `kept`, rank of the sample there); the best-ranked sample
    # takes the slot of the first one seen so the output order is stable and follows the file.
    slots: dict[tuple[str, str, tuple[str, ...]], tuple[int, int]] = {}
    for raw in reader(path):
        report.read += 1
        reason, record, rank = _validate(raw)
        if record is None:
            skipped[reason] += 1
            continue
        key = (record.culture, normalise_question(record.question), record.options)
        if key in slots:
            slot, held_rank = slots[key]
            skipped["duplicate"] += 1
            if rank < held_rank:
                kept[slot] = record
                slots[key] = (slot, rank)
            continue
        slots[key] = (len(kept), rank)
        kept.append(record)

    report.kept = len(kept)
    report.skipped = skipped
    if not kept:
        detail = f"read {report.read} records" + (f", skipped {_format_skips(skipped)}" if skipped else "")
        raise SurveyDataError(f"{label}: no usable survey records ({detail})")
    return kept, report


# --------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------


def normalise_question(text: str) -> str:
    """Lowercase, collapse runs of whitespace to one space and strip, so trivially different texts match."""
    return " ".join(text.lower().split())


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values) or sum(values) <= 0:
        raise SurveyDataError(
            f"split fractions must be three non-negative numbers with a positive sum, got {fractions!r}"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def question_split(
    question: str, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), salt: str = ""
) -> Split:
    """Assign a question to train/val/test from a sha256 of salt + its normalised text (stable everywhere)."""
    train, val, _ = _check_fractions(fractions)
    digest = hashlib.sha256((salt + normalise_question(question)).encode("utf-8")).digest()
    # 64 bits of the digest as a uniform draw in [0, 1); Python's hash() is salted per process, sha256 is not.
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def split_records(
    records: Iterable[SurveyRecord], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), salt: str = ""
) -> dict[str, list[SurveyRecord]]:
    """Split records by question so that every culture's answers to one question land in the same split."""
    _check_fractions(fractions)
    out: dict[str, list[SurveyRecord]] = {s: [] for s in SPLITS}
    cache: dict[str, Split] = {}
    for record in records:
        key = normalise_question(record.question)
        if key not in cache:
            cache[key] = question_split(key, fractions, salt)
        out[cache[key]].append(record)
    return out


# --------------------------------------------------------------------------------------------------------
# Culture selection and similarity
# --------------------------------------------------------------------------------------------------------


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
    """Choose the cultures to train on (named, or the `top` N by distinct questions) and those held out."""
    counts = _question_counts(records)
    if (cultures is None) == (top is None):
        raise SurveyDataError("give exactly one of cultures or top to choose the cultures to train on")
    known = list(counts)
    held = list(dict.fromkeys(lookup_culture(name, known) for name in held_out))

    if cultures is not None:
        trained = list(dict.fromkeys(lookup_culture(name, known) for name in cultures))
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

    assert top is not None
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


def _by_culture(records: Iterable[SurveyRecord]) -> dict[str, dict[str, SurveyRecord]]:
    table: dict[str, dict[str, SurveyRecord]] = defaultdict(dict)
    for record in records:
        table[record.culture].setdefault(normalise_question(record.question), record)
    return table


def _similarity(a: dict[str, SurveyRecord], b: dict[str, SurveyRecord]) -> float | None:
    # Imported here, not at the top: workers.scoring pulls in torch and transformers, which loading data and
    # validating a CLI's arguments should not have to wait for.
    from workers.scoring import alignment

    scores = []
    for key in a.keys() & b.keys():
        ra, rb = a[key], b[key]
        # One question can be coded with different option sets in different waves (e.g. with or without
        # "DK/Refused"); distributions over different options are not comparable, so such pairs are left out.
        if ra.options != rb.options:
            continue
        scores.append(float(alignment(np.asarray(ra.distribution), np.asarray(rb.distribution))))
    return sum(scores) / len(scores) if scores else None


def culture_similarity(records: Iterable[SurveyRecord], a: str, b: str) -> float | None:
    """Mean of 1 - Jensen-Shannon distance (base 2) over questions both cultures answered; None if none."""
    table = _by_culture(records)
    known = list(table)
    ca, cb = lookup_culture(a, known), lookup_culture(b, known)
    return _similarity(table[ca], table[cb])


def nearest_cultures(
    records: Iterable[SurveyRecord], culture: str, candidates: Iterable[str] | None, k: int
) -> list[tuple[str, float]]:
    """Return up to k (culture, similarity) pairs most similar to `culture`, best first (candidates None: all)."""
    table = _by_culture(records)
    known = list(table)
    target = lookup_culture(culture, known)
    pool = known if candidates is None else [lookup_culture(c, known) for c in candidates]
    scored = []
    for other in dict.fromkeys(pool):
        if other == target:
            continue
        score = _similarity(table[target], table[other])
        if score is not None:
            scored.append((other, score))
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[: max(k, 0)]
