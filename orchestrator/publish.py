"""Publishing experts to <output_dir>/experts: a whole new set appears at once, or nothing changes.

`experts` is a symbolic link to a sibling folder `.experts-<random>`. A new set is written into a fresh
folder, flushed to disk, and the link is replaced with a rename, so a server reading `experts` sees the old
set or the new one, never a mix, and a run with nothing to publish leaves the old set in place.

A new set is the previous one with this run's experts added, or replacing their culture's where they share
its base and prompt shape (`replace=True`: this run's experts alone). Survey similarity covers every
published culture, from the answers each set keeps of its experts' cultures.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from orchestrator.survey import similarity_table
from orchestrator.survey.records import SurveyRecord
from workers.cultures import SHARED, slug
from workers.defaults import CHAMPION
from workers.expert_file import ExpertMeta, load_expert
from workers.expert_store import (
    SIMILARITY_FILE,
    Registry,
    Similarity,
    expert_files,
    load_similarity,
    registered_experts,
)

if TYPE_CHECKING:
    from orchestrator.survey import ExperimentData

ANSWERS_FILE = "answers.json"  # culture -> its survey answers: {"iso", "questions": {text: options, dist}}
Answers = dict[str, dict]
COMPLETE = ".complete"  # written last into a set's folder: only complete sets are ever removed
# What must match for an expert to take another's place in a served set (one base serves them all).
SHAPE = ("num_virtual_tokens", "prefix_tokens", "hidden_size")


class Offered(Protocol):
    """An expert offered for publishing (a `Winner`, or a `Published` one): its file and PEFT adapter."""

    culture: str

    @property
    def expert_file(self) -> Path: ...

    @property
    def adapter_dir(self) -> Path: ...


@dataclass(frozen=True)
class Published:
    """An expert in a published set (or a registry download): its file and, where it has one, its adapter."""

    culture: str
    expert_file: Path
    adapter_dir: Path
    meta: ExpertMeta


def published_experts(directory: Path) -> dict[str, Published]:
    """The experts in a published set (or any folder of expert files), by culture ({} where there is none)."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    found = {}
    for path in expert_files(directory):
        meta = load_expert(path).meta
        # A set keeps adapters under peft/<slug>; a registry download, one folder a culture, beside the file.
        nested = path.parent != directory
        adapter = path.parent / "peft" if nested else directory / "peft" / slug(meta.culture)
        found[meta.culture] = Published(meta.culture, path, adapter, meta)
    return found


def refusal(new: ExpertMeta, previous: dict[str, Published]) -> str | None:
    """Why `new` may not join the previous set: another base, or a shape unlike the one it replaces."""
    old = previous.get(new.culture)
    bases = {p.meta.base_fingerprint for p in previous.values()}
    if bases and new.base_fingerprint not in bases:
        return (
            f"its base {new.base_model} (fingerprint {new.base_fingerprint}) is not the published set's "
            f"(fingerprint {', '.join(sorted(bases))})"
        )
    if old is not None and any(getattr(new, k) != getattr(old.meta, k) for k in SHAPE):
        shape = ", ".join(f"{k} {getattr(new, k)} (published: {getattr(old.meta, k)})" for k in SHAPE)
        return f"its prompt shape differs from the published expert's: {shape}"
    return None


def publish_experts(
    directory: Path,
    winners: dict[str, Offered],
    data: ExperimentData | None,
    replace: bool = False,
) -> Path | None:
    """Swap in a set of the previous experts plus `winners` (or `winners` alone), with survey similarity.

    A winner with another base, or another prompt shape than the expert it would replace, is refused with
    one line naming it and why; the others are published. Returns None where nothing was published.
    """
    directory = Path(directory)
    previous = {} if replace else published_experts(directory)
    accepted = {}
    for culture, winner in sorted(winners.items()):
        why = refusal(load_expert(winner.expert_file).meta, previous)
        if why is None:
            accepted[culture] = winner
        else:
            print(
                f"warning: not publishing {culture}: {why}; publish it alone with --replace", file=sys.stderr
            )
    if not accepted:
        kept = f"keeping the experts already in {directory}" if directory.exists() else "nothing to publish"
        print(f"warning: no new expert to publish; {kept}", file=sys.stderr)
        return None
    experts = {c: p for c, p in previous.items() if c not in accepted} | accepted
    root = directory.parent
    root.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=root))
    try:
        for culture, expert in sorted(experts.items()):
            shutil.copy2(expert.expert_file, version / f"{slug(culture)}.safetensors")
            if expert.adapter_dir.is_dir():
                shutil.copytree(expert.adapter_dir, version / "peft" / slug(culture))
        answers = set_answers(directory, experts, accepted, data)
        (version / ANSWERS_FILE).write_text(json.dumps(answers, sort_keys=True))
        if data is not None:
            old = load_similarity(directory / SIMILARITY_FILE)
            write_similarity(version, data, sorted(experts), answers, old)
        (version / COMPLETE).touch()
        _flush(version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)  # half a set is never published, nor left behind
        raise
    before = _swap_in(directory, version)
    _remove_old_versions(directory, keep={version.name, before})
    kept = len(experts) - len(accepted)
    print(f"saved {len(accepted)} experts to {directory} ({len(experts)} published, {kept} kept)", flush=True)
    return directory


def publish_champions(
    directory: Path, registry: Registry, data: ExperimentData | None, alias: str = CHAMPION
) -> Path | None:
    """Rebuild the published set from the registry: each culture's expert under `alias`, and nothing else."""
    directory = Path(directory)
    rows = [r for r in registered_experts(registry) if alias in r["aliases"]]
    if not rows:
        print(
            f"warning: no expert is registered under {alias!r}; {directory} is left as it is", file=sys.stderr
        )
        return None
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".registry-", dir=directory.parent) as tmp:
        for row in rows:  # the versions read once: one consistent set, even if an alias moves meanwhile
            uri, folder = f"models:/{row['model']}/{row['version']}", Path(tmp) / row["model"]
            registry.call(
                f"download {row['model']} v{row['version']}",
                lambda u=uri, f=folder: _download(u, f, registry),
            )
        return publish_experts(directory, published_experts(Path(tmp)), data, replace=True)


def _download(uri: str, folder: Path, registry: Registry) -> None:
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(uri, dst_path=str(folder))


def set_answers(directory: Path, experts: dict, accepted: dict, data: ExperimentData | None) -> Answers:
    """The survey answers of every expert culture of a new set: this run's for its experts, else those kept.

    A set written before sets kept answers has none: its cultures take this run's data where it has them.
    """
    path = directory / ANSWERS_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    fresh = survey_answers(data.records, sorted(experts)) if data is not None else {}
    answers = {}
    for culture in experts:
        first, second = (fresh, stored) if culture in accepted else (stored, fresh)
        entry = first.get(culture) or second.get(culture)
        if entry is not None:
            answers[culture] = entry
    return answers


def _flush(folder: Path) -> None:
    """fsync every file and folder of a new set, so that the swap never points at data still in the cache."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(directory: Path, version: Path) -> str | None:
    """Point `directory` at `version` with one rename; return the folder it pointed at before."""
    if directory.is_symlink():
        previous = os.readlink(directory)
    elif directory.exists():
        # A plain folder from before links existed: moved aside once, not deleted.
        previous = tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent)
        os.rmdir(previous)
        directory.rename(previous)
        (Path(previous) / COMPLETE).touch()
        previous = Path(previous).name
    else:
        previous = None
    link = directory.parent / f".{directory.name}-link-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)  # relative: the output directory can move as a whole
    os.replace(link, directory)
    _fsync(directory.parent)  # the rename itself reaches the disk
    return previous


def _remove_old_versions(directory: Path, keep: set) -> None:
    """Delete complete sets older than the previous one (a reader may still be in the previous one).

    A folder without the completion mark is another publisher's set being written: it is left alone.
    """
    for folder in directory.parent.glob(f".{directory.name}-*"):
        if folder.name in keep or folder.is_symlink() or not (folder / COMPLETE).exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)


def survey_answers(records: list[SurveyRecord], cultures: list[str]) -> Answers:
    """Each of `cultures`' survey answers in `records` (those it has), as `answers.json` keeps them."""
    wanted, out = set(cultures), {}
    for r in records:
        if r.culture in wanted:
            entry = out.setdefault(r.culture, {"iso": r.iso, "questions": {}})
            entry["questions"].setdefault(r.question, {"options": r.options, "distribution": r.distribution})
    return out


def answer_records(answers: Answers) -> list[SurveyRecord]:
    """Stored survey answers as survey records again (what similarity is computed from)."""
    return [
        SurveyRecord(culture, entry["iso"], question, tuple(q["options"]), tuple(q["distribution"]))
        for culture, entry in answers.items()
        for question, q in entry["questions"].items()
    ]


def write_similarity(
    directory: Path,
    data: ExperimentData,
    experts: list[str],
    answers: Answers | None = None,
    previous: Similarity | None = None,
) -> Path:
    """For every culture with survey answers, its survey similarity to each expert's culture (for committees).

    The data's answers count for every culture but those in `answers` (the stored answers of experts an
    earlier run trained); a pair neither can score keeps its value in `previous` (the last set's table).
    """
    answers = answers or {}
    records = [r for r in data.records if r.culture not in answers] + answer_records(answers)
    known = {r.culture for r in records}
    rows = [c for c in dict.fromkeys([*data.selection.counts, *answers, *(previous or {})]) if c in known]
    # The prior is no culture: committees of similar cultures never draw it.
    columns = [e for e in experts if e != SHARED and e in known]
    table = similarity_table(records, rows, columns)
    for culture, row in (previous or {}).items():
        for other, value in row.items():
            if other in experts and other != culture:
                table.setdefault(culture, {}).setdefault(other, value)
    path = directory / SIMILARITY_FILE
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return path
