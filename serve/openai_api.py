"""The OpenAI-compatible endpoints: chat completions, legacy completions and the model list.

Requests are OpenAI's, and every field either does what OpenAI's does or is refused with a 400 naming it:
`refuse_unsupported` (serve/openai_fields.py) runs before validation. Honoured: the text (`messages` of text
parts, or `prompt`), `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `n` (up to
`serve.limits.max_choices`), `stop`, `logprobs` / `top_logprobs` (of the committee's mixed distribution),
`stream` and `stream_options`; shores adds `committee_size`. Accepted and ignored, as they change no output:
`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, `safety_identifier`, `prompt_cache_key`.
Fields that would change the output (tools, response formats, logit bias, penalties other than 0, images,
audio, ...) are refused unless they hold their no-op value (null, `tool_choice: "none"`, `response_format:
{"type": "text"}`, ...), and so is any field OpenAI does not define, as OpenAI itself answers.

The endpoints reach the rest of the server through one small interface, `Gateway` (the router implements it):
authorising and reading bodies, routing, the catalogue, and the pool's answers, whole or streamed. This module
turns requests into pool jobs and answers into OpenAI's shapes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serve.answers import DONE, EVENT_STREAM, event, members
from serve.errors import OPENAI_PATHS, ApiError, error_body
from serve.openai_fields import refuse_unsupported
from serve.protocol import (
    Catalogue,
    Choice,
    GenerateAnswer,
    GenerateEnd,
    GenerateJob,
    GenerateStart,
    TokenLogprobs,
    TokenPiece,
)
from serve.request_checks import new_tokens
from serve.schemas import AUTO, MODEL_PREFIX, ChatRequest, CompletionRequest, OpenAIRequest
from serve.settings import LimitsSection
from workers.committees import BASE, Committee
from workers.cultures import slug
from workers.routing import Routed

logger = logging.getLogger("ray.serve")
Body = TypeVar("Body", bound=BaseModel)


def model_culture(model: str) -> str | None:
    """The culture a `shores:<culture>` model id names (None for `shores:auto`); 404 for other models."""
    name = model[len(MODEL_PREFIX) :].strip() if model.startswith(MODEL_PREFIX) else ""
    if not name:
        raise ApiError(404, f"unknown model {model!r}: use shores:<culture>, shores:auto or shores:base")
    return None if name == AUTO else name


def model_list(catalogue: Catalogue, created: int) -> dict:
    """OpenAI's model list: shores:auto, shores:base and one shores:<culture> per expert."""
    ids = [AUTO, BASE] + [slug(e.culture) for e in catalogue.experts]
    cards = [
        {"id": MODEL_PREFIX + i, "object": "model", "created": created, "owned_by": "shores"} for i in ids
    ]
    return {"object": "list", "data": cards}


# ---- what the endpoints need from the rest of the server ----


class Gateway(Protocol):
    """The endpoints' one way into the server (the router implements it)."""

    def authorise(self, request: Request) -> None:
        """A 401 unless the request carries the key (when one is needed)."""
        ...

    async def read(self, request: Request, schema: type[Body], check: Callable[[dict], None]) -> Body:
        """The request's body as `schema`, authorised and within the caps (`check` runs on the parsed JSON)."""
        ...

    async def route(self, request: Request, culture: str | None, text: str, k: int | None) -> Routed:
        """The committee for `culture` (None: from `text`), its model id, and why."""
        ...

    async def catalogue(self) -> Catalogue:
        """The experts served and the cultures answered by committees."""
        ...

    async def complete(self, job: GenerateJob) -> GenerateAnswer:
        """The pool's answer to a generation, whole."""
        ...

    async def stream(self, job: GenerateJob) -> tuple[GenerateStart, AsyncIterator[TokenPiece | GenerateEnd]]:
        """The pool's first event of a streamed generation, and the rest."""
        ...


def error_event(err: ApiError) -> str:
    """A stream's last event when it fails after its status was sent (what the `openai` client raises)."""
    return event(error_body(OPENAI_PATHS[0], err.status, err.message, err.param))


class OpenAIEndpoints:
    """POST /v1/chat/completions, POST /v1/completions and GET /v1/models."""

    def __init__(self, gateway: Gateway, limits: LimitsSection, created: int):
        self.gateway, self.limits, self.created = gateway, limits, created  # created: the model cards' time

    async def models(self, request: Request) -> dict:
        """OpenAI model list: shores:auto, shores:base and one shores:<culture> per expert."""
        self.gateway.authorise(request)
        return model_list(await self.gateway.catalogue(), self.created)

    async def chat_completions(self, request: Request) -> dict | StreamingResponse:
        """OpenAI chat completion (streamed with `stream: true`); `shores:auto` routes from the conversation's
        system and user text."""
        gateway = self.gateway
        body = await gateway.read(request, ChatRequest, lambda data: refuse_unsupported(data, "chat"))
        culture = model_culture(body.model)
        max_new_tokens = new_tokens(body.max_completion_tokens or body.max_tokens, self.limits)
        # The chat template knows system, user and assistant; OpenAI's newer `developer` is a system message.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        if not any(m["content"].strip() for m in messages):
            raise ApiError(422, "messages: every message is empty")
        context = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
        routed = await gateway.route(request, culture, context, body.committee_size)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = self._job(body, routed.committee, max_new_tokens, logprobs, messages=messages)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": routed.model}
        return await self._answer(body, job, routed, head, _ChatChunks, "chat.completion", _chat_choice)

    async def completions(self, request: Request) -> dict | StreamingResponse:
        """OpenAI legacy completion of a text prompt (streamed with `stream: true`); `shores:auto` routes from
        the prompt."""
        gateway = self.gateway
        body = await gateway.read(
            request, CompletionRequest, lambda data: refuse_unsupported(data, "completions")
        )
        culture = model_culture(body.model)
        max_new_tokens = new_tokens(body.max_tokens, self.limits)
        routed = await gateway.route(request, culture, body.prompt, body.committee_size)
        job = self._job(body, routed.committee, max_new_tokens, body.logprobs, prompt=body.prompt)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": routed.model}
        return await self._answer(
            body, job, routed, head, _CompletionChunks, "text_completion", _completion_choice
        )

    async def _answer(
        self,
        body: OpenAIRequest,
        job: GenerateJob,
        routed: Routed,
        head: dict,
        chunks: type[_Chunks],
        kind: str,
        content: Callable[[Choice], dict],
    ) -> dict | StreamingResponse:
        """The job's answer: streamed as `chunks` events when the body asks, else whole, an object of `kind`
        whose choices hold `content(choice)` between their index and finish reason."""
        if body.stream:
            start, rest = await self.gateway.stream(job)
            events = chunks(head, start, routed, job, _usage_asked(body))
            return StreamingResponse(events.events(rest), media_type=EVENT_STREAM)
        answer = await self.gateway.complete(job)
        choices = [
            {"index": c.index} | content(c) | {"finish_reason": c.finish_reason} for c in answer.choices
        ]
        return self._whole(head | {"object": kind}, choices, answer, routed)

    def _whole(self, head: dict, choices: list[dict], answer: GenerateAnswer, routed: Routed) -> dict:
        """An answer that is not streamed: its choices, the usage of them all, and shores' committee and
        routing."""
        return head | {
            "choices": choices,
            "usage": usage(answer.prompt_tokens, sum(c.completion_tokens for c in answer.choices)),
            "committee": members(routed.committee, answer),
            "routing": routed.routing.as_dict(),
            "experts_version": answer.experts_version,
        }

    def _job(
        self, body: OpenAIRequest, committee: Committee, max_new_tokens: int, logprobs: int | None, **text
    ) -> GenerateJob:
        n, cap = body.n or 1, self.limits.max_choices
        if n > cap:
            raise ApiError(422, f"n {n} is over the cap of {cap}", param="n")
        return GenerateJob(
            committee,
            max_new_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            seed=body.seed,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stop or [],
            logprobs=logprobs,
            n=n,
            **text,
        )


def _usage_asked(body: OpenAIRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(entries: list[TokenLogprobs]) -> dict:
    """Chat's `logprobs`: one entry per token, with its bytes and the most likely tokens at its step."""

    def candidate(c) -> dict:
        return {"token": c.text, "logprob": c.logprob, "bytes": c.bytes}

    content = [candidate(e.chosen) | {"top_logprobs": [candidate(c) for c in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def _chat_choice(choice: Choice) -> dict:
    """A chat completion choice's message and logprobs."""
    logprobs = None if choice.logprobs is None else chat_logprobs(choice.logprobs)
    return {"message": {"role": "assistant", "content": choice.text}, "logprobs": logprobs}


def _completion_choice(choice: Choice) -> dict:
    """A legacy completion choice's text and logprobs."""
    logprobs = None if choice.logprobs is None else completion_logprobs(choice.logprobs)
    return {"text": choice.text, "logprobs": logprobs}


def completion_logprobs(entries: list[TokenLogprobs]) -> dict:
    """Legacy completions' `logprobs`: tokens, their log probabilities, the most likely at each step, and where
    each token's text starts in the choice's text."""
    return {
        "tokens": [e.chosen.text for e in entries],
        "token_logprobs": [e.chosen.logprob for e in entries],
        "top_logprobs": [{c.text: c.logprob for c in e.top} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


class _Chunks:
    """A stream's events: one per piece of text (or per token, with logprobs), each choice's end, the usage
    if asked, then [DONE]; an error after the start is the last event."""

    object = ""

    def __init__(
        self,
        head: dict,
        start: GenerateStart,
        routed: Routed,
        job: GenerateJob,
        usage: bool,
    ):
        self.head = head | {"object": self.object} | ({"usage": None} if usage else {})
        self.start, self.job, self.usage = start, job, usage
        self.shores = {
            "committee": members(routed.committee, start),
            "routing": routed.routing.as_dict(),
            "experts_version": start.experts_version,
        }

    def first(self) -> list[str]:
        return []

    def piece(self, index: int, text: str, logprobs: TokenLogprobs | None) -> str:
        raise NotImplementedError

    def end(self, index: int, reason: str) -> str:
        raise NotImplementedError

    def chunk(self, choices: list[dict], **extra) -> str:
        return event(self.head | {"choices": choices} | extra)

    async def events(self, rest: AsyncIterator[TokenPiece | GenerateEnd]) -> AsyncIterator[str]:
        tokens = 0
        try:
            async with aclosing(rest):  # closed with this stream, so that a client going away cancels it
                for first in self.first():
                    yield first
                async for item in rest:
                    if isinstance(item, TokenPiece) and (item.text or item.logprobs is not None):
                        yield self.piece(item.index, item.text, item.logprobs)
                    if isinstance(item, GenerateEnd):
                        if item.text:
                            yield self.piece(item.index, item.text, None)
                        yield self.end(item.index, item.finish_reason)
                        tokens += item.completion_tokens
        except ApiError as err:  # the status is sent already: the error is the stream's last event
            yield error_event(err)
            return
        except Exception:  # noqa: BLE001 - a bug must still end the stream with an error event
            logger.exception("a stream failed")
            yield error_event(ApiError(500, "internal error while streaming"))
            return
        if self.usage:
            yield self.chunk([], usage=usage(self.start.prompt_tokens, tokens))
        yield DONE


class _ChatChunks(_Chunks):
    """OpenAI's `chat.completion.chunk` events; the first holds each choice's role and shores' committee."""

    object = "chat.completion.chunk"

    def _choice(
        self, index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None
    ) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def first(self) -> list[str]:
        roles = [self._choice(i, {"role": "assistant", "content": ""}) for i in range(self.job.n)]
        return [self.chunk(roles, **self.shores)]

    def piece(self, index: int, text: str, logprobs: TokenLogprobs | None) -> str:
        entries = chat_logprobs([logprobs]) if logprobs is not None else None
        return self.chunk([self._choice(index, {"content": text}, entries)])

    def end(self, index: int, reason: str) -> str:
        return self.chunk([self._choice(index, {}, finish=reason)])


class _CompletionChunks(_Chunks):
    """OpenAI's streamed `text_completion` events; the first also holds shores' committee."""

    object = "text_completion"
    sent_shores = False

    def _chunk(self, index: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
        extra = {} if self.sent_shores else self.shores
        self.sent_shores = True
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self.chunk([choice], **extra)

    def piece(self, index: int, text: str, logprobs: TokenLogprobs | None) -> str:
        return self._chunk(index, text, completion_logprobs([logprobs]) if logprobs is not None else None)

    def end(self, index: int, reason: str) -> str:
        return self._chunk(index, "", finish=reason)
