"""Survey data: loading and cleaning records, splits by question, culture selection, survey similarity, and
one experiment's prepared data, and the survey programme of each question.

Country names are resolved by `workers.cultures` (shared with serving); the names it exports that survey
code used to hold are re-exported here so `from orchestrator.survey import ...` keeps working.
"""

from orchestrator.survey.experiment_data import ExperimentData, foreign_data, prepare_data
from orchestrator.survey.fingerprint import DataFingerprint, data_fingerprint, validation_records
from orchestrator.survey.loading import HF_DATASET, HF_FILENAME, SKIP_REASONS, LoadReport, load_survey
from orchestrator.survey.programmes import (
    PROGRAMMES,
    options_programme,
    programme_counts,
    question_programmes,
)
from orchestrator.survey.records import SurveyDataError, SurveyRecord, normalise_question
from orchestrator.survey.selection import CultureSelection, present_cultures, select_cultures
from orchestrator.survey.similarity import culture_similarity, nearest_cultures, similarity_table
from orchestrator.survey.splits import SPLITS, TRANSFER_SPLITS, Split, Transfer, question_split, split_records
from workers.cultures import UnknownCultureError, canonical_country, resolve_culture

__all__ = [
    "HF_DATASET",
    "HF_FILENAME",
    "SKIP_REASONS",
    "PROGRAMMES",
    "SPLITS",
    "TRANSFER_SPLITS",
    "CultureSelection",
    "DataFingerprint",
    "ExperimentData",
    "LoadReport",
    "Split",
    "Transfer",
    "SurveyDataError",
    "SurveyRecord",
    "UnknownCultureError",
    "canonical_country",
    "culture_similarity",
    "data_fingerprint",
    "foreign_data",
    "load_survey",
    "nearest_cultures",
    "options_programme",
    "prepare_data",
    "present_cultures",
    "programme_counts",
    "question_programmes",
    "normalise_question",
    "question_split",
    "resolve_culture",
    "select_cultures",
    "similarity_table",
    "split_records",
    "validation_records",
]
