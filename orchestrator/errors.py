"""The errors a user can cause: the CLI and HTTP edges turn these into one clear line."""

from orchestrator.config import ConfigError
from orchestrator.experts import ExpertsNotFoundError
from orchestrator.survey import SurveyDataError
from orchestrator.tracking import TrackingError
from workers.base_model import BaseModelError
from workers.prompts import PromptMismatchError

USER_ERRORS = (
    ConfigError,
    SurveyDataError,
    BaseModelError,
    PromptMismatchError,
    ExpertsNotFoundError,
    TrackingError,
    FileNotFoundError,
)
