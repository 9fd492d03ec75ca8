"""The errors a user can cause: the CLI and HTTP edges turn these into one clear line."""

from orchestrator.config import ConfigError
from orchestrator.registry import TrackingError
from orchestrator.survey import SurveyDataError
from workers.base_model import BaseModelError
from workers.cultures import UnknownCultureError
from workers.expert_file import PromptMismatchError
from workers.expert_store import ExpertsNotFoundError, RegistryError

USER_ERRORS = (
    ConfigError,
    SurveyDataError,
    UnknownCultureError,
    BaseModelError,
    PromptMismatchError,
    ExpertsNotFoundError,
    TrackingError,
    RegistryError,
    FileNotFoundError,
)
