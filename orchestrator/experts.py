"""The expert store's write side: one safetensors file and one PEFT adapter a culture, plus survey similarity.

The read side (loading experts, the similarity file, the registry) is `workers.expert_store`, which serving
uses too. A published set also keeps each expert culture's survey answers (`answers.json`), so that a later
run that adds or retrains other cultures can recompute the similarity of every published culture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.survey import data_fingerprint, similarity_table
from orchestrator.survey.records import SurveyRecord
from workers.base_model import FrozenBase
from workers.cultures import SHARED, slug
from workers.expert_file import ExpertMeta, save_expert
from workers.expert_store import SIMILARITY_FILE, Similarity
from workers.peft_export import PeftExportError, export_peft_adapter
from workers.prompts import SoftPromptBank, persona_text

if TYPE_CHECKING:
    from orchestrator.survey import ExperimentData

ANSWERS_FILE = "answers.json"  # culture -> its survey answers: {"iso", "questions": {text: options, dist}}
Answers = dict[str, dict]


def save_experts(
    directory: Path, bank: SoftPromptBank, base: FrozenBase, data: ExperimentData, summaries: dict[str, dict]
) -> list[Path]:
    """Write every expert of a bank (safetensors + PEFT adapter)."""
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
    return paths


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
