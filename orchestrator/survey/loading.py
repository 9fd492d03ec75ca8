"""Load survey opinion distributions (GlobalOpinionQA and its flattened forms) into clean per-culture records.

The loader accepts the flattened JSONL/JSON form (one record per country and question), the original
GlobalOpinionQA CSV (one row per question, a Python-literal dict of country -> shares), or the dataset on the
Hugging Face Hub. Bad records are skipped and counted rather than fatal, so one odd row in a user's file does
not stop a run, while the report still says exactly what was dropped and why: a line that is not JSON, a CSV
row that cannot be read, a question with more than 26 options (the letters A-Z) are each one skipped record.
Only a file with no usable record at all is an error.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.survey.records import SurveyDataError, SurveyRecord, normalise_question
from workers.cultures import canonical_country, sample_rank

# A question's options are lettered A-Z (`workers.scoring.LETTERS`): no more can be asked or answered.
MAX_OPTIONS = 26

HF_DATASET = "Anthropic/llm_global_opinions"
HF_FILENAME = "data/global_opinions.csv"

# Each skipped record is counted under the first reason in this order that applies to it.
SKIP_REASONS: tuple[str, ...] = (
    "malformed",
    "unknown_country",
    "too_few_options",
    "too_many_options",
    "length_mismatch",
    "nan_or_negative",
    "zero_sum",
    "duplicate",
)


@dataclass
class LoadReport:
    """What a load saw, kept and skipped (reason -> count, only reasons that occurred)."""

    path: str
    file: str = ""  # the file read, absolute (a download's, for the Hub)
    sha256: str = ""  # of the file's bytes: which survey an expert was trained on
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


def _format_skips(skipped: dict[str, int]) -> str:
    # Fixed reason order keeps the line stable across runs, whatever order the skips happened in.
    known = [r for r in SKIP_REASONS if skipped.get(r)]
    other = sorted(r for r in skipped if r not in SKIP_REASONS and skipped[r])
    return ", ".join(f"{r} {skipped[r]}" for r in known + other)


def _one_line(text: object) -> str:
    # Exception texts from json/ast/the hub can span lines; the CLI prints our messages as a single line.
    return " ".join(str(text).split())


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


def scale_order(labels: list[str]) -> list[int]:
    """The options' order with a numbered scale's points in numeric order: the text before the first number
    (the low anchor), the numbers sorted, then the other text. Some GlobalOpinionQA rows list a 0-10 scale as
    "Not important at all, 1, Very important, 2, ..., 9"; any other option list keeps its order."""
    numbers = [i for i, label in enumerate(labels) if label.lstrip("-").isdigit()]
    if len(numbers) < 2:
        return list(range(len(labels)))
    first = numbers[0]
    rest = [i for i in range(first, len(labels)) if i not in numbers]
    return list(range(first)) + sorted(numbers, key=lambda i: int(labels[i])) + rest


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
    if len(options) > MAX_OPTIONS:  # the letters A-Z: a longer question can be neither trained nor asked
        return "too_many_options", None, 0
    if len(options) != len(distribution):
        return "length_mismatch", None, 0
    shares = [float(v) for v in distribution]
    if any(not math.isfinite(v) or v < 0 for v in shares):
        return "nan_or_negative", None, 0
    total = math.fsum(shares)
    if total <= 0:
        return "zero_sum", None, 0
    order = scale_order(labels)
    record = SurveyRecord(
        culture=resolved[0],
        iso=resolved[1],
        question=question,
        options=tuple(labels[i] for i in order),
        distribution=tuple(shares[i] / total for i in order),
    )
    return "", record, sample_rank(country)


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
    for line in _read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            yield None  # one bad line is one malformed record: the rest of the file is still good
            continue
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
    # csv's field limit (128 KB) is a guard for streams; this file is in memory already, so no field of it
    # can be larger than the text, and one long selections field must not abort the whole load.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        try:
            fields = reader.fieldnames or []
        except csv.Error as exc:
            raise SurveyDataError(f"{path}: line 1: bad CSV header ({_one_line(exc)})") from exc
        missing = [c for c in ("question", "selections", "options") if c not in fields]
        if missing:
            raise SurveyDataError(
                f"{path}: not a GlobalOpinionQA CSV (missing column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}; expected question, selections, options, source)"
            )
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield None  # one row csv cannot read is one malformed record; the reader goes on after it
                continue
            yield from _csv_row(row)
    finally:
        csv.field_size_limit(limit)


def _csv_row(row: dict) -> Iterator[_Raw | None]:
    """One GlobalOpinionQA row's records: one a country, or one malformed record if it cannot be parsed."""
    question = row.get("question")
    try:
        selections = _literal(row.get("selections") or "")
        options = _literal(row.get("options") or "")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # An unparseable row is one malformed record: its countries cannot be known.
        yield None
        return
    if not isinstance(selections, dict):
        yield None
        return
    for country, distribution in selections.items():
        yield _Raw(country, question, options, distribution)


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


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise SurveyDataError(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from exc
    return digest.hexdigest()


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

    report = LoadReport(path=label, file=str(path.resolve()), sha256=file_sha256(path))
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
