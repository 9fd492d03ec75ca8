"""One experiment's data: the usable survey records, the chosen cultures, and every record's split."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from orchestrator.config import DataSection, SharedSection
from orchestrator.survey.loading import LoadReport, load_survey
from orchestrator.survey.pooling import pooled_records, sample_questions
from orchestrator.survey.records import SurveyRecord
from orchestrator.survey.selection import CultureSelection, present_cultures, select_cultures
from orchestrator.survey.splits import Transfer, split_records
from workers.cultures import SHARED
from workers.defaults import SPLIT_FRACTIONS


@dataclass
class ExperimentData:
    """The usable survey records, the chosen cultures, and every record's split."""

    records: list[SurveyRecord]
    report: LoadReport
    selection: CultureSelection
    splits: dict[str, list[SurveyRecord]]
    # The shared prior's records by split (every question's answers pooled over all countries); empty
    # when the experiment trains no prior. Kept apart from `records`: `shared` is no culture of the survey.
    pooled: dict[str, list[SurveyRecord]] = field(default_factory=dict)
    # How the questions were split (train, val, test fractions and the salt): part of every expert's
    # data fingerprint, so that its validation split can be rebuilt from the file.
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS
    salt: str = ""
    # The programme held out in transfer_val / transfer_test (None: no transfer split); in the fingerprint too.
    transfer: Transfer | None = None

    @property
    def experts(self) -> list[str]:
        """Every expert the experiment trains: the chosen cultures' and, first, the shared prior."""
        return ([SHARED] if self.pooled else []) + self.selection.trained

    def records_of(self, split: str, cultures: list[str]) -> dict[str, list[SurveyRecord]]:
        """Per culture (or `shared`), its records in a split (`all` for every split)."""
        pool = self.records if split == "all" else self.splits[split]
        if SHARED in cultures and self.pooled:
            pooled = self.pooled.values() if split == "all" else [self.pooled[split]]
            pool = [*pool, *(r for records in pooled for r in records)]
        wanted, out = set(cultures), defaultdict(list)
        for record in pool:
            if record.culture in wanted:
                out[record.culture].append(record)
        return {c: out[c] for c in cultures}


def prepare_data(
    section: DataSection, path: str | None = None, shared: SharedSection | None = None
) -> ExperimentData:
    """Load, clean and split the survey, choose the cultures, and pool every country's answers for the prior.

    The prior learns from all countries in the file, whatever the selection: the held-out cultures too,
    on their training questions only, since the splits are by question.
    """
    records, report = load_survey(path or section.path)
    transfer = transfer_of(section)
    selection = select_cultures(
        records, section.cultures, section.top, section.question_floor, section.held_out
    )
    pooled = {}
    fractions, salt = section.split, section.split_salt
    if shared is not None and shared.enabled:
        pooled = split_records(pooled_records(records), fractions, salt, transfer)
        pooled["train"] = sample_questions(pooled["train"], shared.max_questions)
    splits = split_records(records, fractions, salt, transfer)
    return ExperimentData(records, report, selection, splits, pooled, fractions, salt, transfer)


def foreign_data(
    section: DataSection, records: list[SurveyRecord], report: LoadReport, experts: list[str]
) -> tuple[ExperimentData, list[str]]:
    """Another survey file's records for experts trained elsewhere: their cultures and the config's
    held-out ones that it holds (notes say what it lacks), split as training splits its own file."""
    selection, notes = present_cultures(records, experts, section.held_out, report.path)
    transfer = transfer_of(section)
    splits = split_records(records, section.split, section.split_salt, transfer)
    data = ExperimentData(records, report, selection, splits, {}, section.split, section.split_salt, transfer)
    return data, notes


def transfer_of(section: DataSection) -> Transfer | None:
    """The config's transfer split (`data.transfer`), or None."""
    return Transfer(section.transfer.hold_out, section.transfer.val) if section.transfer else None
