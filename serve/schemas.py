"""The HTTP request bodies, validated before anything reaches a model (the contracts: README, docs/serving.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.generation import SEED_LIMIT


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class Routing(Strict):
    """Who answers: a culture (`base` for the plain model), else a free-text profile, else the query itself."""

    culture: str | None = None
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
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    stream: bool = False  # server-sent events, one a token

    _check_prompt = field_validator("prompt")(_not_blank)


class ContentPart(BaseModel):
    """One typed part of an OpenAI message's content; only text parts are read, and their text is a string."""

    model_config = ConfigDict(extra="allow")  # image or audio parts carry their own keys

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a string `text`")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI messages carry optional keys such as `name`

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


class ChatRequest(BaseModel):
    """An OpenAI chat completion request; options shores does not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    n: int = Field(default=1, ge=1, le=1)  # one choice: a committee decodes one text
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    committee_size: int | None = Field(default=None, ge=1)
