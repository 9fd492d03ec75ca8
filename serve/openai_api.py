"""The OpenAI-compatible endpoints: chat completions, legacy completions and the model list.

Requests are OpenAI's, and every field either does what OpenAI's does or is refused with a 400 naming it:
`refuse_unsupported` runs before validation. Honoured: the text (`messages` of text parts, or `prompt`),
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `n` (up to
`serve.limits.max_choices`), `stop`, `logprobs` / `top_logprobs` (of the committee's mixed distribution),
`stream` and `stream_options`; shores adds `committee_size`. Accepted and ignored, as they change no output:
`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, `safety_identifier`, `prompt_cache_key`.
Fields that would change the output (tools, response formats, logit bias, penalties other than 0, images,
audio, ...) are refused unless they hold their no-op value (null, `tool_choice: "none"`, `response_format:
{"type": "text"}`, ...), and so is any field OpenAI does not define, as OpenAI itself answers.

The router (the `Gateway` here) reads bodies, routes, calls the pool and streams; this module turns requests
into pool jobs and answers into OpenAI's shapes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from orchestrator.config import ServeSection
from serve.errors import OPENAI_PATHS, ApiError, error_body
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
from serve.schemas import MODEL_PREFIX, ChatRequest, CompletionRequest, OpenAIRequest
from workers.committees import BASE, Committee
from workers.cultures import slug
from workers.routing import Routed

logger = logging.getLogger("ray.serve")
AUTO = "auto"
EVENT_STREAM = "text/event-stream"
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream, as OpenAI sends it
Body = TypeVar("Body", bound=BaseModel)

# ---- which fields are honoured, accepted or refused ----

_SHARED = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options"}
HONOURED = {
    "chat": _SHARED | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "committee_size"},
    "completions": _SHARED | {"prompt", "logprobs", "committee_size"},
}
HARMLESS = {  # accepted and ignored: bookkeeping, routing and caching hints that change no output
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
}
NO_OP: dict[str, list[Any]] = {  # refused unless they hold a value that changes nothing
    "tools": [None, []],
    "tool_choice": [None, "none"],
    "functions": [None, []],
    "function_call": [None, "none"],
    "response_format": [None, {"type": "text"}],
    "logit_bias": [None, {}],
    "presence_penalty": [None, 0],
    "frequency_penalty": [None, 0],
    "modalities": [None, ["text"]],
    "audio": [None],
    "prediction": [None],
    "reasoning_effort": [None],
    "verbosity": [None],
    "web_search_options": [None],
    "echo": [None, False],  # completions: would need the prompt's log probabilities
    "best_of": [None, 1],  # completions: also accepted when equal to n
    "suffix": [None, ""],  # completions: insertion
}
MESSAGE_NO_OP: dict[str, list[Any]] = {  # a message's keys besides role and content
    "name": [None],  # the chat template has no speaker names
    "tool_calls": [None, []],
    "tool_call_id": [None],
    "function_call": [None],
    "audio": [None],
    "refusal": [None],
}


def refuse_unsupported(data: dict, endpoint: str) -> None:
    """A 400 naming the first field of an OpenAI request that shores does not honour and that would change
    the output (`endpoint` is `chat` or `completions`)."""
    for key, value in data.items():
        if key in HONOURED[endpoint] or key in HARMLESS:
            continue
        if key not in NO_OP:
            raise ApiError(400, f"unknown field {key!r}", param=key)
        if value in NO_OP[key] or (key == "best_of" and value == data.get("n", 1)):
            continue
        raise ApiError(400, f"{key} is not supported by this server (only {_no_op(NO_OP[key])})", param=key)
    if endpoint == "chat" and isinstance(data.get("messages"), list):
        for i, message in enumerate(data["messages"]):
            if isinstance(message, dict):
                _refuse_in_message(i, message)
    prompt = data.get("prompt")
    if endpoint == "completions" and isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "prompt: token ids are not supported; send the prompt as text", param="prompt")


def _refuse_in_message(i: int, message: dict) -> None:
    if message.get("role") in ("tool", "function"):
        raise ApiError(
            400,
            f"messages[{i}].role: {message['role']} messages are not supported (no tools)",
            param="messages",
        )
    for key, value in message.items():
        if key not in ("role", "content") and value not in MESSAGE_NO_OP.get(key, [None]):
            raise ApiError(400, f"messages[{i}].{key} is not supported by this server", param="messages")
    content = message.get("content")
    for j, part in enumerate(content if isinstance(content, list) else []):
        if isinstance(part, dict) and part.get("type") != "text":
            raise ApiError(
                400,
                f"messages[{i}].content[{j}]: {part.get('type')} parts are not supported (text only)",
                param="messages",
            )


def _no_op(values: list[Any]) -> str:
    return " or ".join(json.dumps(v) for v in values)


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


# ---- what the endpoints need from the router ----


class Gateway(Protocol):
    """The router's side: reading bodies, routing, and the pool."""

    section: ServeSection
    started: int

    def authorise(self, request: Request) -> None: ...

    async def read(self, request: Request, schema: type[Body], check: Callable[[dict], None]) -> Body: ...

    async def route(self, request: Request, culture: str | None, text: str, k: int | None) -> Routed: ...

    def new_tokens(self, asked: int | None) -> int: ...

    async def catalogue(self) -> Catalogue: ...

    async def complete(self, job: GenerateJob) -> GenerateAnswer: ...

    async def stream(
        self, job: GenerateJob
    ) -> tuple[GenerateStart, AsyncIterator[TokenPiece | GenerateEnd]]: ...

    def members(self, committee: Committee, answer: GenerateAnswer | GenerateStart) -> list[dict]: ...


def event(data: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(data)}\n\n"


def error_event(err: ApiError) -> str:
    """A stream's last event when it fails after its status was sent (what the `openai` client raises)."""
    return event(error_body(OPENAI_PATHS[0], err.status, err.message, err.param))


class OpenAIEndpoints:
    """POST /v1/chat/completions, POST /v1/completions and GET /v1/models."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def models(self, request: Request) -> dict:
        """OpenAI model list: shores:auto, shores:base and one shores:<culture> per expert."""
        self.gateway.authorise(request)
        return model_list(await self.gateway.catalogue(), self.gateway.started)

    async def chat_completions(self, request: Request) -> dict | StreamingResponse:
        """OpenAI chat completion (streamed with `stream: true`); `shores:auto` routes from the conversation's
        system and user text."""
        gateway = self.gateway
        body = await gateway.read(request, ChatRequest, lambda data: refuse_unsupported(data, "chat"))
        culture = model_culture(body.model)
        max_new_tokens = gateway.new_tokens(body.max_completion_tokens or body.max_tokens)
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
        max_new_tokens = gateway.new_tokens(body.max_tokens)
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
            events = chunks(head, start, routed, job, _usage_asked(body), self.gateway)
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
            "committee": self.gateway.members(routed.committee, answer),
            "routing": routed.routing.as_dict(),
            "experts_version": answer.experts_version,
        }

    def _job(
        self, body: OpenAIRequest, committee: Committee, max_new_tokens: int, logprobs: int | None, **text
    ) -> GenerateJob:
        n, cap = body.n or 1, self.gateway.section.limits.max_choices
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
        gateway: Gateway,
    ):
        self.head = head | {"object": self.object} | ({"usage": None} if usage else {})
        self.start, self.job, self.usage = start, job, usage
        self.shores = {
            "committee": gateway.members(routed.committee, start),
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
