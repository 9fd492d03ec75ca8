"""The HTTP request bodies, validated before anything reaches a model (the contracts: README, docs/serving.md).

shores' own endpoints refuse unknown keys (422). The OpenAI endpoints' bodies are checked first by
`serve.openai_fields.refuse_unsupported` (400 for a field that would change the output and is not honoured, as
OpenAI answers an unknown one); these models then validate the fields honoured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.defaults import MAX_TOP_LOGPROBS, SEED_LIMIT

MODEL_PREFIX = "shores:"  # model ids are shores:<culture>, shores:auto and shores:base
AUTO = "auto"  # shores:auto: the router picks the committee from the text
MAX_NAME_CHARS = 100  # culture names (the longest country name has 56 characters)
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions' cap on `logprobs`


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    """OpenAI's `stop` (a string, a list of up to 4, or null) as a list of non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s for s in stops):
        raise ValueError("a stop string must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
    return stops


class Routing(Strict):
    """Who answers: a culture (`base` for the plain model), else a free-text profile, else the query itself."""

    culture: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    profile: str | None = None
    committee_size: int | None = Field(default=None, ge=1)

    _check_text = field_validator("culture", "profile")(_not_blank)


class OpinionRequest(Routing):
    question: str
    options: list[str] = Field(min_length=2)

    _check_question = field_validator("question")(_not_blank)

    @field_validator("options")
    @classmethod
    def _options_not_blank(cls, options: list[str]) -> list[str]:
        if any(not o.strip() for o in options):
            raise ValueError("options must not be empty")
        return options


class GenerateRequest(Routing):
    prompt: str
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=5)  # 0: greedy
    top_p: float = Field(default=1.0, ge=0, le=1)  # sampling from the nucleus of this mass
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] = []  # the text ends before the first of these (a list once validated)
    stream: bool = False  # server-sent events, one a token

    _check_prompt = field_validator("prompt")(_not_blank)
    _check_stop = field_validator("stop")(_stop_strings)


class ContentPart(BaseModel):
    """One typed part of an OpenAI message's content: text (other types are refused before validation)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a string `text`")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # keys that change nothing (a null `name`) are checked before

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """The message's text (OpenAI content may be a list of typed parts; text parts are joined)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content if p.type == "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False  # a last chunk with the usage and no choices


class OpenAIRequest(BaseModel):
    """The fields chat and legacy completions share, as OpenAI defines them (plus shores' committee_size)."""

    model_config = ConfigDict(extra="ignore")  # every other key was checked by refuse_unsupported

    model: str = Field(max_length=len(MODEL_PREFIX) + MAX_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)  # the cap is serve.limits.max_choices
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    committee_size: int | None = Field(default=None, ge=1)

    _check_stop = field_validator("stop")(_stop_strings)


class ChatRequest(OpenAIRequest):
    """An OpenAI chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(OpenAIRequest):
    """An OpenAI (legacy) completion request: one text prompt."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("one prompt per request")
            prompt = prompt[0]
        if not prompt.strip():
            raise ValueError("must not be empty")
        return prompt
