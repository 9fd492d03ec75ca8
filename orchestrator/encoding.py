"""The encoding every path shares: survey records as model-ready questions (training, selection, scoring)."""

from __future__ import annotations

from orchestrator.survey import ExperimentData, SurveyRecord
from workers.base_model import FrozenBase
from workers.prompts import persona_text
from workers.scoring import EncodedQuestion, encode_question


def encode(
    base: FrozenBase, records: list[SurveyRecord], max_length: int, persona: bool = False
) -> list[EncodedQuestion]:
    """Records as model-ready questions, optionally under the culture's hard-text persona."""
    return [
        encode_question(
            base.tokenizer,
            r.question,
            r.options,
            r.distribution,
            persona_text(r.culture) if persona else None,
            max_length,
        )
        for r in records
    ]


def encoded(
    base: FrozenBase, data: ExperimentData, split: str, cultures: list[str], max_length: int
) -> dict[str, list[EncodedQuestion]]:
    """Per culture, its records in a split as model-ready questions: what a trainer trains or selects on."""
    return {c: encode(base, r, max_length) for c, r in data.records_of(split, cultures).items()}
