"""The expert store's write side: one safetensors file and one PEFT adapter a culture, plus survey similarity.

The read side (loading experts, the similarity file, the registry) is `workers.expert_store`, which serving
uses too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.survey import data_fingerprint, similarity_table
from workers.base_model import FrozenBase
from workers.cultures import slug
from workers.expert_store import SIMILARITY_FILE
from workers.prompts import (
    ExpertMeta,
    PeftExportError,
    SoftPromptBank,
    export_peft_adapter,
    persona_text,
    save_expert,
)
from workers.settings import SHARED

if TYPE_CHECKING:
    from orchestrator.survey import ExperimentData


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
        iso = next((r.iso for r in data.records if r.culture == culture), "")  # the prior has none
        meta = ExpertMeta(
            culture=culture,
            iso=iso,
            num_virtual_tokens=bank.num_virtual_tokens,
            hidden_size=base.hidden_size,
            base_model=base.name,
            base_fingerprint=base.fingerprint,
            # What its validation alignment was measured on, so that champions are compared like with like.
            training=summaries.get(culture, {}) | {"data": data_fingerprint(data, culture).to_dict()},
            descriptor=persona_text(culture),
        )
        expert = bank.expert(i, meta)  # its parts, and their shapes in the metadata
        paths.append(save_expert(directory / f"{slug(culture)}.safetensors", expert))
        try:
            export_peft_adapter(expert, base.model, directory / "peft" / slug(culture))
        except PeftExportError:
            pass  # a composed expert (prefix + input tokens) has no single PEFT form; its safetensors stand
    if similarity:
        write_similarity(directory, data, bank.cultures)
    return paths


def write_similarity(directory: Path, data: ExperimentData, experts: list[str]) -> Path:
    """For every culture in the data, its survey similarity to each expert's culture (for committees)."""
    # The prior is no culture: committees of similar cultures never draw it.
    table = similarity_table(data.records, data.selection.counts, [e for e in experts if e != SHARED])
    path = directory / SIMILARITY_FILE
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return path
