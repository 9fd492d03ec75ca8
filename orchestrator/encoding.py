"""The encoding every path shares: survey records as model-ready questions (training, selection, scoring)."""

from __future__ import annotations

from orchestrator.survey import ExperimentData, SurveyRecord
from workers.base_model import FrozenBase
from workers.prompts import persona_text
from workers.renderings import AS_WRITTEN, asked_in_chat, rendering, training_renderings
from workers.scoring import EncodedQuestion, encode_question


def encode(
    base: FrozenBase,
    records: list[SurveyRecord],
    max_length: int,
    persona: bool = False,
    shown: str = AS_WRITTEN,
) -> list[EncodedQuestion]:
    """Records as model-ready questions in one rendering (`workers/renderings.py`), optionally under the
    culture's hard-text persona; each is answered in both option orders."""
    out = []
    for record in records:
        written = rendering(record.options, shown)
        out.append(
            encode_question(
                base.tokenizer,
                record.question,
                written.options,
                written.target(record.distribution),
                persona_text(record.culture) if persona else None,
                max_length,
                chat=asked_in_chat(shown),
            )
        )
    return out


def training_examples(
    base: FrozenBase, records: list[SurveyRecord], max_length: int
) -> list[EncodedQuestion]:
    """Records as training examples: each carries its renderings (`training_renderings`), each asked as a
    survey and as a chat, one of which the trainer draws each epoch, in one option order (the draw covers
    both)."""
    out = []
    for record in records:
        shown = [
            encode_question(
                base.tokenizer,
                record.question,
                r.options,
                r.target(record.distribution),
                max_length=max_length,
                both_orders=False,
                chat=chat,
            )
            for chat in (False, True)
            for r in training_renderings(record.options)
        ]
        out.append(EncodedQuestion(shown[0].input_ids, shown[0].n_options, shown[0].target, renderings=shown))
    return out


def encoded(
    base: FrozenBase, data: ExperimentData, split: str, cultures: list[str], max_length: int
) -> dict[str, list[EncodedQuestion]]:
    """Per culture, its records in a split as model-ready questions: what a trainer trains (`train`: with
    their renderings) or selects on (any other split: as written, both option orders)."""
    records = data.records_of(split, cultures)
    if split == "train":
        return {c: training_examples(base, r, max_length) for c, r in records.items()}
    return {c: encode(base, r, max_length) for c, r in records.items()}
