"""Router: the HTTP ingress. It checks each request, resolves it to a committee, and asks the ExpertPool.

Errors a client can cause are 4xx with `{"error": "..."}`, and change nothing on the server. Bodies are read
and parsed here (not by FastAPI's automatic parsing) so that the size cap holds before any JSON is parsed
and every error has the same one-line shape. (No `from __future__ import annotations` here: FastAPI
reads the endpoints' annotations at run time, through Serve's ingress wrapper.)
"""

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.config import ServeSection
from serve.pool import (
    BadRequestError,
    Catalogue,
    ExpertsNotLoadedError,
    GenerateAnswer,
    GenerateEnd,
    GenerateJob,
    GenerateStart,
    OpinionAnswer,
    OpinionJob,
    TokenPiece,
)
from serve.schemas import ChatRequest, GenerateRequest, OpinionRequest
from workers.committees import BASE, Committee, TextRouter, culture_committee
from workers.cultures import UnknownCultureError, culture_key, find_culture, slug

logger = logging.getLogger("ray.serve")
Body = TypeVar("Body", bound=BaseModel)
MODEL_PREFIX = "shores:"
AUTO = "auto"
EVENT_STREAM = "text/event-stream"
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream, as OpenAI sends it


def _event(data: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(data)}\n\n"


class ApiError(Exception):
    """An error the client caused (or may retry), answered as `{"error": message}` with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# /docs and /openapi.json are off unless `serve.docs` turns them on (Router.__init__).
api = FastAPI(
    title="shores",
    description="Cultural experts as soft prompts on one frozen LM, behind a router.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else err.headers
    return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)


class RouterMetrics:
    """The router's series on Ray's Prometheus endpoint: requests and errors, and latency, by endpoint."""

    def __init__(self) -> None:
        tags = ("endpoint", "expert", "status")
        self.requests = Counter("shores_requests", "HTTP requests answered", tag_keys=tags)
        self.errors = Counter("shores_request_errors", "HTTP requests answered with an error", tag_keys=tags)
        self.latency = Histogram(
            "shores_request_latency_s",
            "Seconds from a request's arrival to its answer",
            [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
            tag_keys=("endpoint", "expert"),
        )


_metrics: RouterMetrics | None = None  # made in the replica on first use, not when the module is imported


@api.middleware("http")
async def _observe(request: Request, call_next):
    global _metrics
    start = time.perf_counter()
    try:
        response = await call_next(request)
        status = response.status_code
    except RecursionError:  # a body nested too deeply for any parser on the way: the client's fault
        response, status = JSONResponse({"error": "the body is nested too deeply"}, status_code=400), 400
    _metrics = _metrics or RouterMetrics()
    # The matched route's path, not the URL: unknown paths must not make a new series each.
    endpoint = getattr(request.scope.get("route"), "path", "unmatched")
    expert = getattr(request.state, "expert", "none")  # the model id routing chose (shores:<culture>)
    tags = {"endpoint": endpoint, "expert": expert, "status": str(status)}
    _metrics.requests.inc(tags=tags)
    if status >= 400:
        _metrics.errors.inc(tags=tags)
    _metrics.latency.observe(time.perf_counter() - start, tags={"endpoint": endpoint, "expert": expert})
    return response


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)


def _body_schema(model: type[BaseModel]) -> dict:
    # Bodies are parsed by hand (see the module docstring); this keeps them in the OpenAPI page at /docs.
    schema = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"content": schema, "required": True}}


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


@serve.deployment(max_constructor_retry_count=3)
@serve.ingress(api)
class Router:
    """Validates, routes to a committee, calls the pool, and answers in the contract's shapes."""

    def __init__(self, pool: DeploymentHandle, section: ServeSection):
        self.pool = pool
        self.section = section
        self.started = int(time.time())
        if section.docs and api.openapi_url is None:
            api.openapi_url, api.docs_url = "/openapi.json", "/docs"
            api.setup()  # adds the OpenAPI and docs routes, now that they have paths
        self.api_key = None
        if self.section.api_key_env:
            self.api_key = os.environ.get(self.section.api_key_env)
            if not self.api_key:
                raise RuntimeError(f"serve.api_key_env names {self.section.api_key_env}, which is not set")
        self.text_router = TextRouter(self.section.router_model)
        # Fast tokenizers are not safe to call from two threads at once: one thread embeds.
        self.embed_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.catalogue: Catalogue | None = None
        self.catalogue_lock = asyncio.Lock()
        self.refresher = None
        self.pending: set[asyncio.Task] = set()
        if self.section.reload_interval_s > 0:
            self.refresher = asyncio.get_running_loop().create_task(
                self._refresh_every(self.section.reload_interval_s)
            )

    # ---- the pool and its catalogue ----

    async def _catalogue(self, refresh: bool = False) -> Catalogue:
        async with self.catalogue_lock:
            if self.catalogue is None or refresh:
                self.catalogue = await self._ask("catalogue")
        return self.catalogue

    async def _refresh_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._catalogue(refresh=True)
            except ApiError as err:  # the pool may be restarting; the next request or tick tries again
                logger.warning("catalogue refresh failed: %s", err.message)

    async def _ask(self, method: str, *args):
        """Call the pool once, within the request deadline; every failure is one JSON error, never a replay."""
        response = getattr(self.pool, method).remote(*args)
        async with self._pool_errors(method, response):
            result = await asyncio.wait_for(response, self.section.request_timeout_s)
        version = getattr(result, "experts_version", None)
        if version and self.catalogue and version != self.catalogue.version:
            task = asyncio.get_running_loop().create_task(self._catalogue(refresh=True))  # a replica reloaded
            self.pending.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self.pending.discard)
        return result

    async def _next_event(self, events: DeploymentResponseGenerator):
        """The next event of a streaming pool call, within the request deadline (the same errors as `_ask`).

        The deadline holds for each event: a stream may run longer than it, as long as it keeps coming."""
        async with self._pool_errors("stream", events):
            return await asyncio.wait_for(events.__anext__(), self.section.request_timeout_s)

    @asynccontextmanager
    async def _pool_errors(self, method: str, response: DeploymentResponse | DeploymentResponseGenerator):
        """A pool call's failures as ApiErrors.

        A replica that dies while running a request is not retried (the request may have had effects, and a
        poison request would kill replica after replica): 503. Over the deadline the call is cancelled: 504.
        A committee naming experts that the replica has not loaded (a reload raced the request) is a 409, after
        a catalogue refresh, so that the client's retry is routed to the experts loaded now.
        """
        retry = {"Retry-After": str(self.section.retry_after_s)}
        try:
            yield
        except TimeoutError:
            response.cancel()  # the replica stops working on it
            raise ApiError(
                504, f"the expert pool did not answer within {self.section.request_timeout_s} s"
            ) from None
        except BackPressureError:
            raise ApiError(503, "the server is overloaded; retry shortly", retry) from None
        except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as err:
            logger.warning("pool call %s failed, not retried: %s", method, type(err).__name__)
            raise ApiError(503, "the expert replica answering this request stopped; retry", retry) from None
        except ExpertsNotLoadedError as err:
            await self._catalogue(refresh=True)
            raise ApiError(409, err.message) from None
        except BadRequestError as err:
            raise ApiError(422, err.message) from None
        except RayTaskError as err:
            logger.error("pool call %s failed: %s", method, err)
            raise ApiError(500, f"internal error while answering ({type(err.cause).__name__})") from None

    async def _stream(
        self, job: GenerateJob
    ) -> tuple[GenerateStart, AsyncIterator[TokenPiece | GenerateEnd]]:
        """Start a streaming generation: its first event (errors in the request are raised here, as ApiErrors,
        before any response is sent) and an iterator over the rest.

        The rest ends with the GenerateEnd, or raises an ApiError mid-way; if it is left early (the client
        went away and Serve cancelled this request), the pool's call is cancelled, and with it the engine's rows.
        """
        events = self.pool.options(stream=True).stream.remote(job)
        try:
            start = await self._next_event(events)
        except BaseException:
            events.cancel()
            raise

        async def rest() -> AsyncIterator[TokenPiece | GenerateEnd]:
            ended = False
            try:
                while not ended:
                    event = await self._next_event(events)
                    ended = isinstance(event, GenerateEnd)
                    yield event
            finally:
                if not ended:
                    events.cancel()

        return start, rest()

    # ---- request checks ----

    def _authorise(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <key>)")

    async def _body(self, request: Request, schema: type[Body]) -> Body:
        """The request's JSON body as `schema`: 413 over the size cap, 400 if not JSON, 422 if invalid."""
        self._authorise(request)
        cap = self.section.max_body_bytes
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(declared) > cap:
            raise ApiError(413, f"request body of {declared} bytes is over the cap of {cap}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                raise ApiError(413, f"request body is over the cap of {cap} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"malformed JSON: {err}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as err:
            raise ApiError(422, _first_error(err)) from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None
        asked, cap = getattr(body, "committee_size", None), self.section.max_committee_size
        if asked is not None and asked > cap:
            raise ApiError(422, f"committee_size {asked} is over the cap of {cap}")
        return body

    def _new_tokens(self, asked: int | None) -> int:
        cap = self.section.max_new_tokens
        if asked is not None and asked > cap:
            raise ApiError(422, f"max_new_tokens {asked} is over the cap of {cap}")
        return asked or self.section.default_max_new_tokens

    # ---- routing ----

    async def _committee(self, culture: str | None, text: str, k: int | None) -> tuple[Committee, str]:
        """The committee for an explicit culture, else for the text; and the model id that names the choice."""
        k = k or self.section.committee_size
        temperature = self.section.routing_temperature
        catalogue = await self._catalogue()
        if culture is not None:
            if culture_key(culture) == BASE:
                return Committee([(BASE, 1.0)]), MODEL_PREFIX + BASE
            for refresh in (
                False,
                True,
            ):  # a culture unknown here may have been registered since the last look
                if refresh:
                    catalogue = await self._catalogue(refresh=True)
                experts = [e.culture for e in catalogue.experts]
                try:
                    committee = culture_committee(culture, experts, catalogue.similarity, k, temperature)
                except UnknownCultureError as err:
                    error = err
                    continue
                name = find_culture(culture, experts + list(catalogue.similarity))
                return committee, MODEL_PREFIX + slug(name)
            raise ApiError(404, str(error))
        descriptors = {e.culture: e.descriptor or e.culture for e in catalogue.experts}
        try:
            committee = await asyncio.get_running_loop().run_in_executor(
                self.embed_thread, self.text_router.committee, text, descriptors, k, temperature
            )
        except UnknownCultureError as err:
            raise ApiError(503, str(err)) from None
        return committee, MODEL_PREFIX + AUTO

    def _model_culture(self, model: str) -> str | None:
        """The culture a `shores:<culture>` model id names (None for `shores:auto`); 404 for other models."""
        if not model.startswith(MODEL_PREFIX) or not model[len(MODEL_PREFIX) :].strip():
            raise ApiError(404, f"unknown model {model!r}: use shores:<culture>, shores:auto or shores:base")
        name = model[len(MODEL_PREFIX) :].strip()
        return None if name == AUTO else name

    @staticmethod
    def _members(committee: Committee, answer: OpinionAnswer | GenerateAnswer | GenerateStart) -> list[dict]:
        return [
            {"culture": c, "weight": round(w, 6), "version": answer.versions.get(c)}
            for c, w in committee.members
        ]

    # ---- endpoints ----

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness only: the router answers (no key needed, nothing disclosed)."""
        return {"status": "ok"}

    @api.get("/v1/status")
    async def status(self, request: Request) -> dict:
        """A pool replica's identity, experts version and batching counters (needs the key)."""
        self._authorise(request)
        pool = await self._ask("health")
        return {"status": "ok", "pool": asdict(pool)}

    @api.get("/v1/experts")
    async def experts(self, request: Request) -> dict:
        """The experts served (culture, version, descriptor) and the cultures answered by committees."""
        self._authorise(request)
        catalogue = await self._catalogue()
        own = {e.culture for e in catalogue.experts}
        return {
            "experts": [asdict(e) for e in catalogue.experts],
            "committee_cultures": sorted(c for c in catalogue.similarity if c not in own),
            "base_model": catalogue.base_model,
            "experts_version": catalogue.version,
        }

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """OpenAI model list: shores:auto, shores:base and one shores:<culture> per expert."""
        self._authorise(request)
        catalogue = await self._catalogue()
        ids = [AUTO, BASE] + [slug(e.culture) for e in catalogue.experts]
        cards = [
            {"id": MODEL_PREFIX + i, "object": "model", "created": self.started, "owned_by": "shores"}
            for i in ids
        ]
        return {"object": "list", "data": cards}

    @api.post("/v1/opinion", openapi_extra=_body_schema(OpinionRequest))
    async def opinion(self, request: Request) -> dict:
        """A committee's distribution over the options of one survey-style question."""
        body = await self._body(request, OpinionRequest)
        if len(body.options) > self.section.max_options:
            raise ApiError(422, f"too many options: {len(body.options)} (at most {self.section.max_options})")
        committee, model = await self._committee(
            body.culture, body.profile or body.question, body.committee_size
        )
        request.state.expert = model  # the metrics' expert tag
        answer: OpinionAnswer = await self._ask("opinion", OpinionJob(body.question, body.options, committee))
        return {
            "distribution": answer.distribution,
            "committee": self._members(committee, answer),
            "model": model,
            "experts_version": answer.experts_version,
        }

    @api.post("/v1/generate", openapi_extra=_body_schema(GenerateRequest), response_model=None)
    async def generate(self, request: Request) -> dict | StreamingResponse:
        """A committee's joint continuation of a prompt (greedy at temperature 0, else seeded sampling)."""
        body = await self._body(request, GenerateRequest)
        max_new_tokens = self._new_tokens(body.max_new_tokens)
        committee, model = await self._committee(
            body.culture, body.profile or body.prompt, body.committee_size
        )
        request.state.expert = model  # the metrics' expert tag
        job = GenerateJob(
            committee, max_new_tokens, prompt=body.prompt, temperature=body.temperature, seed=body.seed
        )
        if body.stream:
            start, rest = await self._stream(job)
            return StreamingResponse(
                self._generate_events(start, rest, committee, model), media_type=EVENT_STREAM
            )
        answer: GenerateAnswer = await self._ask("generate", job)
        return {
            "text": answer.text,
            "finish_reason": answer.finish_reason,
            "committee": self._members(committee, answer),
            "model": model,
            "experts_version": answer.experts_version,
        }

    def _generate_events(
        self, start: GenerateStart, rest: AsyncIterator, committee: Committee, model: str
    ) -> AsyncIterator[str]:
        """/v1/generate's events: `{"token", "text"}` a token, then the answer's keys with the text held back
        (`text`, `finish_reason`, `completion_tokens`, `committee`, `model`, `experts_version`), then [DONE]."""

        async def events() -> AsyncIterator[str]:
            try:
                async with aclosing(rest):  # closed with this stream, so that a client going away cancels it
                    async for event in rest:
                        if isinstance(event, TokenPiece):
                            yield _event({"token": event.token, "text": event.text})
                            continue
                        yield _event(
                            {
                                "text": event.text,
                                "finish_reason": event.finish_reason,
                                "completion_tokens": event.completion_tokens,
                                "committee": self._members(committee, start),
                                "model": model,
                                "experts_version": start.experts_version,
                            }
                        )
            except ApiError as err:  # the status is sent already: the error is the stream's last event
                yield _event({"error": err.message})
                return
            yield DONE

        return events()

    @api.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest), response_model=None)
    async def chat_completions(self, request: Request) -> dict | StreamingResponse:
        """OpenAI chat completion (streamed with `stream: true`); `shores:auto` routes from the conversation's
        system and user text."""
        body = await self._body(request, ChatRequest)
        culture = self._model_culture(body.model)
        max_new_tokens = self._new_tokens(body.max_completion_tokens or body.max_tokens)
        # The chat template knows system, user and assistant; OpenAI's newer `developer` is a system message.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        if not any(m["content"].strip() for m in messages):
            raise ApiError(422, "messages: every message is empty")
        context = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
        committee, model = await self._committee(culture, context, body.committee_size)
        request.state.expert = model  # the metrics' expert tag
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        job = GenerateJob(
            committee, max_new_tokens, messages=messages, temperature=temperature, seed=body.seed
        )
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if body.stream:
            start, rest = await self._stream(job)
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = self._chat_chunks(completion, start, rest, committee, usage)
            return StreamingResponse(chunks, media_type=EVENT_STREAM)
        answer: GenerateAnswer = await self._ask("generate", job)
        return completion | {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            },
            "committee": self._members(committee, answer),
            "experts_version": answer.experts_version,
        }

    def _chat_chunks(
        self, completion: dict, start: GenerateStart, rest: AsyncIterator, committee: Committee, usage: bool
    ) -> AsyncIterator[str]:
        """OpenAI's `chat.completion.chunk` events: the role (with shores' committee), the content as it is
        decoded, the finish reason, the usage if asked (`stream_options.include_usage`), then [DONE]."""
        head = completion | {"object": "chat.completion.chunk"} | ({"usage": None} if usage else {})

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            return _event(
                head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]} | extra
            )

        async def chunks() -> AsyncIterator[str]:
            yield chunk(
                {"role": "assistant", "content": ""},
                committee=self._members(committee, start),
                experts_version=start.experts_version,
            )
            try:
                async with aclosing(rest):  # closed with this stream, so that a client going away cancels it
                    async for event in rest:
                        if event.text:
                            yield chunk({"content": event.text})
                        if isinstance(event, GenerateEnd):
                            yield chunk({}, event.finish_reason)
                            if usage:
                                tokens = {
                                    "prompt_tokens": start.prompt_tokens,
                                    "completion_tokens": event.completion_tokens,
                                    "total_tokens": start.prompt_tokens + event.completion_tokens,
                                }
                                yield _event(head | {"choices": [], "usage": tokens})
            except ApiError as err:  # the status is sent already: the error is the stream's last event
                yield _event({"error": {"message": err.message, "type": "server_error", "code": err.status}})
                return
            yield DONE

        return chunks()
