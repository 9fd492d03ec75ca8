"""One experiment's data: the usable survey records, the chosen cultures, and every record's split."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from orchestrator.config import DataSection
from orchestrator.survey.loading import LoadReport, load_survey
from orchestrator.survey.records import SurveyRecord
from orchestrator.survey.selection import CultureSelection, present_cultures, select_cultures
from orchestrator.survey.splits import split_records


@dataclass
class ExperimentData:
    """The usable survey records, the chosen cultures, and every record's split."""

    records: list[SurveyRecord]
    report: LoadReport
    selection: CultureSelection
    splits: dict[str, list[SurveyRecord]]

    def records_of(self, split: str, cultures: list[str]) -> dict[str, list[SurveyRecord]]:
        """Per culture, its records in a split (`all` for every split)."""
        pool = self.records if split == "all" else self.splits[split]
        wanted, out = set(cultures), defaultdict(list)
        for record in pool:
            if record.culture in wanted:
                out[record.culture].append(record)
        return {c: out[c] for c in cultures}


def prepare_data(section: DataSection, path: str | None = None) -> ExperimentData:
    """Load, clean and split the survey, and choose the cultures."""
    records, report = load_survey(path or section.path)
    selection = select_cultures(
        records, section.cultures, section.top, section.min_questions, section.held_out
    )
    return ExperimentData(records, report, selection, split_records(records, section.split))


def foreign_data(
    section: DataSection, records: list[SurveyRecord], report: LoadReport, experts: list[str]
) -> tuple[ExperimentData, list[str]]:
    """Another survey file's records for experts trained elsewhere: their cultures and the config's
    held-out ones that it holds (notes say what it lacks), split as training splits its own file."""
    selection, notes = present_cultures(records, experts, section.held_out, report.path)
    return ExperimentData(records, report, selection, split_records(records, section.split)), notes
