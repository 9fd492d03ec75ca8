"""The HTTP API's route table: every endpoint's method, path, request body and answer, in one place.

The Router binds each route to its own handler (`add_routes`); the generated reference (serve/reference.py)
builds the same FastAPI app without Ray and reads its OpenAPI schema, so the page and the server share one table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import BaseModel

from serve.schemas import ChatRequest, CompletionRequest, GenerateRequest, OpinionRequest

JSON = "application/json"
# The Serve application: `shores serve`, the Serve config, the edge's handle to the router.
APP_NAME = "shores"


@dataclass(frozen=True)
class Route:
    """One endpoint: its method and path, the Router attribute that answers it, what it does and answers."""

    method: str
    path: str
    handler: str  # an attribute path on the Router, e.g. "openai.models"
    summary: str
    answer: str  # the body of a 200
    body: type[BaseModel] | None = None  # the JSON request body, parsed by the router itself


MEMBERS = '"committee": [{"culture", "weight", "version"}], "routing": {"found", "evidence", "method"}'
ROUTES: tuple[Route, ...] = (
    Route(
        "GET", "/healthz", "healthz", "Liveness only; needs no key and answers any Host.", '{"status": "ok"}'
    ),
    Route(
        "GET",
        "/v1/status",
        "status",
        "The router's answers by endpoint and status, and one pool replica's engine, cache and experts.",
        '{"status": "ok", "router": {"answered": {endpoint: {status: count}}}, "pool": {replica, pid, '
        "experts_version, batching counters, engine, cache, reloads, reload_failures, last_good}}",
    ),
    Route(
        "GET",
        "/v1/experts",
        "experts",
        "The experts served and the cultures answered by committees.",
        '{"experts": [{culture, iso, version, descriptor, val_alignment, base_model, prior_weight}], "committee_cultures": [..], '
        '"base_model", "experts_version"}',
    ),
    Route(
        "GET",
        "/v1/models",
        "openai.models",
        "OpenAI's model list: shores:auto, shores:base and shores:<culture> per expert.",
        '{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}',
    ),
    Route(
        "POST",
        "/v1/opinion",
        "opinion",
        "A committee's distribution over the options of one survey question.",
        f'{{"distribution": [..], {MEMBERS}, "model", "experts_version"}}',
        OpinionRequest,
    ),
    Route(
        "POST",
        "/v1/generate",
        "generate",
        "A committee's joint continuation of a prompt: greedy at temperature 0, else seeded sampling.",
        f'{{"text", "finish_reason", {MEMBERS}, "model", "experts_version"}}; with "stream": true, '
        'server-sent events {"token", "text"}, then the answer\'s keys, then [DONE]',
        GenerateRequest,
    ),
    Route(
        "POST",
        "/v1/chat/completions",
        "openai.chat_completions",
        "OpenAI's chat completion; model shores:<culture>, shores:auto (routed from the conversation) "
        "or shores:base.",
        'OpenAI\'s "chat.completion" plus "committee", "routing" and "experts_version"; streamed: "chat.completion.chunk" '
        "events, then [DONE]",
        ChatRequest,
    ),
    Route(
        "POST",
        "/v1/completions",
        "openai.completions",
        "OpenAI's legacy completion: one prompt continued as raw text; model as for chat.",
        'OpenAI\'s "text_completion" plus "committee", "routing" and "experts_version"; streamed: "text_completion" '
        "events, then [DONE]",
        CompletionRequest,
    ),
)


def body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of `model`: bodies are parsed by the router itself, so FastAPI cannot infer it."""
    return {"requestBody": {"content": {JSON: {"schema": model.model_json_schema()}}, "required": True}}


def add_routes(api: FastAPI, handler: Callable[[Route], Callable]) -> None:
    """Add every route of ROUTES to `api`, each answered by `handler(route)`."""
    for route in ROUTES:
        api.add_api_route(
            route.path,
            handler(route),
            methods=[route.method],
            response_model=None,
            summary=route.summary,
            responses={200: {"description": route.answer}},
            openapi_extra=body_schema(route.body) if route.body else None,
        )
