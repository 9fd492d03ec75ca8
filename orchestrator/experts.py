"""A directory of trained experts: one safetensors file and one PEFT adapter a culture, plus survey similarity."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.survey import nearest_cultures
from workers.base_model import FrozenBase
from workers.prompts import (
    Expert,
    ExpertMeta,
    SoftPromptBank,
    export_peft_adapter,
    load_expert,
    persona_text,
    save_expert,
)

if TYPE_CHECKING:
    from orchestrator.experiment import ExperimentData

SIMILARITY_FILE = "similarity.json"


class ExpertsNotFoundError(ValueError):
    """No usable experts where some were expected."""


def slug(culture: str) -> str:
    """A file-name-safe form of a culture name."""
    return re.sub(r"[^a-z0-9]+", "-", culture.lower()).strip("-")


def save_experts(
    directory: Path,
    bank: SoftPromptBank,
    base: FrozenBase,
    data: ExperimentData,
    summaries: dict[str, dict],
    similarity: bool = True,
) -> list[Path]:
    """Write every expert of a bank (safetensors + PEFT adapter) and, optionally, survey similarity."""
    paths = []
    for i, culture in enumerate(bank.cultures):
        iso = next(r.iso for r in data.records if r.culture == culture)
        meta = ExpertMeta(
            culture=culture,
            iso=iso,
            num_virtual_tokens=bank.num_virtual_tokens,
            hidden_size=base.hidden_size,
            base_model=base.name,
            base_fingerprint=base.fingerprint,
            training=summaries.get(culture, {}),
            descriptor=persona_text(culture),
        )
        expert = Expert(bank.prompts[i].detach().cpu(), meta)
        paths.append(save_expert(directory / f"{slug(culture)}.safetensors", expert))
        export_peft_adapter(expert, base.model, directory / "peft" / slug(culture))
    if similarity:
        write_similarity(directory, data, bank.cultures)
    return paths


def write_similarity(directory: Path, data: ExperimentData, experts: list[str]) -> Path:
    """For every culture in the data, its survey similarity to each expert's culture (for committees)."""
    table = {}
    for culture in data.selection.counts:
        table[culture] = dict(
            nearest_cultures(data.records, culture, [e for e in experts if e != culture], len(experts))
        )
    path = directory / SIMILARITY_FILE
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return path


def load_experts(directory: Path, base: FrozenBase | None = None) -> list[Expert]:
    """Every expert in a directory, sorted by culture; each checked against the base model."""
    # Registry downloads nest one folder a culture, each with a PEFT adapter that is not an expert file.
    paths = sorted(p for p in Path(directory).rglob("*.safetensors") if p.name != "adapter_model.safetensors")
    if not paths:
        raise ExpertsNotFoundError(f"no experts (*.safetensors) in {directory}; train some first")
    return sorted((load_expert(p, base) for p in paths), key=lambda e: e.meta.culture)
