"""Router: the HTTP ingress. It checks each request, resolves it to a committee, and asks the ExpertPool.

Errors a client can cause are 4xx with `{"error": "..."}`, and change nothing on the server; every answer,
errors included, is counted by endpoint and status. Bodies are read and parsed here (not by FastAPI's
automatic parsing) so that the size cap holds before any JSON is parsed and every error has the same
one-line shape. Each replica builds its FastAPI app from its config (`__serve_build_asgi_app__`): which Host
names it answers, CORS, the docs pages. The OpenAI-compatible endpoints are in serve/openai_api.py.
"""

import asyncio
import collections
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict
from operator import attrgetter
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from orchestrator.config import ServeSection
from serve import protocol
from serve.edge import EXPERTS_VERSION_HEADER, EdgeRules
from serve.errors import ApiError, error_body
from serve.exposure import allowed_host_names, open_host_refusal, proxy_host
from serve.openai_api import AUTO, DONE, EVENT_STREAM, OpenAIEndpoints, event
from serve.request_checks import (
    bearer_refusal,
    host_refusal,
    key_digest,
    limit_refusal,
    media_type_refusal,
    new_tokens_refusal,
    text_refusal,
    unknown_culture,
)
from serve.routes import add_routes
from serve.schemas import MODEL_PREFIX, GenerateRequest, OpinionRequest
from workers.committees import (
    BASE,
    Committee,
    TextRouter,
    culture_committee,
    prior_weights,
    served_committee,
)
from workers.cultures import CultureIndex, UnknownCultureError, culture_key, is_shared, slug
from workers.engine import EngineStopped
from workers.places import place_index
from workers.routing import BY_CULTURE, Routed, Routing, named, read_text

logger = logging.getLogger("ray.serve")
Body = TypeVar("Body", bound=BaseModel)
OPEN = ("/healthz",)  # paths answered whatever the Host header and the key: liveness tells nothing


class ExposureError(RuntimeError):
    """The router refuses to serve where it would be exposed without a key."""


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


def _error(
    request: Request, status: int, message: str, headers=None, param: str | None = None
) -> JSONResponse:
    body = error_body(request.scope["path"], status, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else err.headers
    return _error(request, err.status, err.message, headers, err.param)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(request, err.status_code, str(err.detail), err.headers)


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def pool_error(err: BaseException, section: ServeSection) -> ApiError | None:
    """A failed pool call as the error its client gets, or None when it is not the pool's (a bug, re-raised).

    A replica that dies or shuts down while running a request is not retried (the request may have had effects,
    and a poison request would kill replica after replica): 503 with Retry-After, as for overload.
    """
    retry = {"Retry-After": str(section.deployment.retry_after_s)}
    if isinstance(err, BackPressureError):
        return ApiError(503, "the server is overloaded; retry shortly", retry)
    if isinstance(err, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        return ApiError(503, "the expert replica answering this request stopped; retry", retry)
    if isinstance(err, EngineStopped):
        return ApiError(503, "the expert replica answering this request is shutting down; retry", retry)
    if isinstance(err, protocol.ExpertsNotLoadedError):
        return ApiError(409, err.message)
    if isinstance(err, protocol.BadRequestError):
        return ApiError(422, err.message)
    if isinstance(err, RayTaskError):
        return ApiError(500, f"internal error while answering ({type(err.cause).__name__})")
    return None


class PoolStream:
    """The rest of a streaming pool call, up to its last choice's end; `aclose()` cancels it unless it ended."""

    def __init__(self, router: "Router", events: DeploymentResponseGenerator, choices: int):
        self.router, self.events, self.left = router, events, choices

    def __aiter__(self) -> "PoolStream":
        return self

    async def __anext__(self) -> protocol.TokenPiece | protocol.GenerateEnd:
        if not self.left:
            raise StopAsyncIteration
        item = await self.router._next_event(self.events)
        self.left -= isinstance(item, protocol.GenerateEnd)
        return item

    async def aclose(self) -> None:
        if self.left:
            self.events.cancel()
            self.left = 0


@serve.deployment(max_constructor_retry_count=3)
@serve.ingress()
class Router:
    """Validates, routes to a committee, calls the pool, and answers in the contract's shapes."""

    async def __init__(self, pool: DeploymentHandle, section: ServeSection):
        self.pool = pool
        self.section = section
        self.started = int(time.time())
        listening = await proxy_host(section.deployment.host)
        refusal = open_host_refusal(listening, section)
        if refusal:
            raise ExposureError(refusal)
        self.hosts = allowed_host_names(section, listening)  # None: any Host header
        self.key_digest = None  # the API key's SHA-256 (None: no key needed)
        if self.section.auth.api_key_env:
            key = os.environ.get(self.section.auth.api_key_env)
            if not key:
                raise RuntimeError(
                    f"serve.auth.api_key_env names {self.section.auth.api_key_env}, which is not set"
                )
            self.key_digest = key_digest(key)
        self.text_router = TextRouter(self.section.routing.router_model)
        # Fast tokenizers are not safe to call from two threads at once: one thread embeds.
        self.embed_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        # Culture names that are no known culture's key are resolved here (bounded lookups, off the loop).
        self.names_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="names")
        self.names_thread.submit(place_index)  # built before the first text is read (about 2 s)
        # The newest catalogue read from the pool, and its names.
        self.snapshot: protocol.Catalogue | None = None
        # Versions older than the snapshot (answers at them come from replicas behind): never adopted again.
        self.superseded: collections.deque[str] = collections.deque(maxlen=64)
        self.names = CultureIndex([])
        self.loading: asyncio.Task | None = None  # the one catalogue call in flight, shared by its waiters
        self.metrics = RouterMetrics()
        self.answered: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.openai = OpenAIEndpoints(self)
        self.pending: set[asyncio.Task] = set()
        self.refresher = None
        if self.section.deployment.reload_interval_s > 0:
            self.refresher = asyncio.get_running_loop().create_task(
                self._refresh_every(self.section.deployment.reload_interval_s)
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's FastAPI app: the endpoints bound to it, and the config's Host, CORS and docs rules."""
        docs = self.section.deployment.docs
        api = FastAPI(
            title="shores",
            description="Cultural experts as soft prompts on one frozen LM, behind a router.",
            docs_url="/docs" if docs else None,
            redoc_url=None,
            openapi_url="/openapi.json" if docs else None,
        )
        api.add_exception_handler(ApiError, _api_error)
        api.add_exception_handler(StarletteHTTPException, _http_error)
        api.middleware("http")(self._observe)
        if self.section.auth.cors_origins:  # outermost: it answers browsers' preflight requests itself
            api.add_middleware(
                CORSMiddleware,
                allow_origins=self.section.auth.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        add_routes(api, lambda route: attrgetter(route.handler)(self))
        return api

    # ---- every request: Host, errors, metrics ----

    async def _observe(self, request: Request, call_next) -> Response:
        start = time.perf_counter()
        try:
            response = self._refuse_host(request) or await call_next(request)
        except RecursionError:  # a body nested too deeply for any parser on the way: the client's fault
            response = _error(request, 400, "the body is nested too deeply")
        except Exception:  # a bug: still one JSON line, and counted
            logger.exception("request %s %s failed", request.method, request.url.path)
            response = _error(request, 500, "internal error while answering")
        status = response.status_code
        if status == 200 and self.snapshot is not None:  # the edge catches up when it sees a newer set
            response.headers[EXPERTS_VERSION_HEADER] = self.snapshot.version
        endpoint = self._endpoint(request)
        expert = getattr(request.state, "expert", "none")  # the model id routing chose (shores:<culture>)
        tags = {"endpoint": endpoint, "expert": expert, "status": str(status)}
        self.metrics.requests.inc(tags=tags)
        if status >= 400:
            self.metrics.errors.inc(tags=tags)
        self.metrics.latency.observe(
            time.perf_counter() - start, tags={"endpoint": endpoint, "expert": expert}
        )
        self.answered[endpoint][str(status)] += 1
        return response

    def _refuse_host(self, request: Request) -> Response | None:
        """A 400 or 421 for a Host header missing or not one of serve.auth.allowed_hosts (DNS rebinding)."""
        if request.scope["path"] in OPEN:
            return None
        refusal = host_refusal(request.headers.get("host"), self.hosts)
        return _error(request, refusal.status, refusal.message) if refusal else None

    @staticmethod
    def _endpoint(request: Request) -> str:
        # The matched route's path, not the URL: unknown paths must not make a new series each.
        route = request.scope.get("route")
        if route is None:  # answered before routing (a refused Host): match it here
            route = next((r for r in request.app.routes if r.matches(request.scope)[0] != Match.NONE), None)
        return getattr(route, "path", "unmatched")

    # ---- the pool and its catalogue ----

    async def catalogue(self, refresh: bool = False) -> protocol.Catalogue:
        """The experts and survey similarity, the newest read from the pool (read now if never, or `refresh`).

        One call to the pool at a time, whoever asks: callers wait for the one in flight, and requests never
        queue behind a lock. A replica behind the others (its reload failed, or has not run yet) answers with an
        older set: the catalogue keeps the newer one, so it never flips back.
        """
        if self.snapshot is not None and not refresh:
            return self.snapshot
        if self.loading is None:
            loading = self.loading = asyncio.get_running_loop().create_task(self._load_catalogue())
            loading.add_done_callback(
                lambda _: setattr(self, "loading", None) if self.loading is loading else None
            )
        return await asyncio.shield(self.loading)

    async def _load_catalogue(self) -> protocol.Catalogue:
        catalogue, current = await self._ask("catalogue"), self.snapshot
        if current is not None and catalogue.version != current.version:
            if catalogue.since < current.since:
                self.superseded.append(catalogue.version)
                return current
            self.superseded.append(current.version)
        if catalogue.version in self.superseded:  # a set served again, reloaded since (an alias moved back)
            self.superseded.remove(catalogue.version)
        known = [e.culture for e in catalogue.experts] + list(catalogue.similarity)
        names = await asyncio.get_running_loop().run_in_executor(self.names_thread, CultureIndex, known)
        self.snapshot, self.names = catalogue, names
        return catalogue

    async def _refresh(self) -> None:
        try:
            await self.catalogue(refresh=True)
        except ApiError as err:  # the pool may be restarting; the next request or tick tries again
            logger.warning("catalogue refresh failed: %s", err.message)

    async def _refresh_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._refresh()

    async def _ask(self, method: str, *args):
        """Call the pool once, within the request deadline; every failure is one JSON error, never a replay."""
        response = getattr(self.pool, method).remote(*args)
        async with self._pool_errors(response):
            result = await asyncio.wait_for(response, self.section.deployment.request_timeout_s)
        version = getattr(result, "experts_version", None)
        if version and self.snapshot and version != self.snapshot.version and version not in self.superseded:
            task = asyncio.get_running_loop().create_task(self._refresh())  # a replica reloaded
            self.pending.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self.pending.discard)
        return result

    async def _next_event(self, events: DeploymentResponseGenerator):
        """The next event of a streaming pool call, within the request deadline (the same errors as `_ask`).

        The deadline holds for each event: a stream may run longer than it, as long as it keeps coming."""
        async with self._pool_errors(events):
            return await asyncio.wait_for(events.__anext__(), self.section.deployment.request_timeout_s)

    @asynccontextmanager
    async def _pool_errors(self, response: DeploymentResponse | DeploymentResponseGenerator):
        """A pool call's failures as ApiErrors (`pool_error`); over the deadline the call is cancelled: 504.

        After a 409 (a committee naming experts the replica has not loaded: a reload raced the request) the
        catalogue is refreshed, so that the client's retry is routed to the experts loaded now.
        """
        try:
            yield
        except TimeoutError:
            response.cancel()  # the replica stops working on it
            raise ApiError(
                504, f"the expert pool did not answer within {self.section.deployment.request_timeout_s} s"
            ) from None
        except Exception as err:
            answer = pool_error(err, self.section)
            if answer is None:
                raise
            if answer.status == 409:
                await self.catalogue(refresh=True)
            elif answer.status == 500 or answer.status == 503:
                logger.warning("pool call failed, not retried: %s", err)
            raise answer from None

    async def complete(self, job: protocol.GenerateJob) -> protocol.GenerateAnswer:
        """A generation, whole."""
        return await self._ask("generate", job)

    async def stream(self, job: protocol.GenerateJob) -> tuple[protocol.GenerateStart, "PoolStream"]:
        """Start a streaming generation: its first event (errors in the request are raised here, as ApiErrors,
        before any response is sent) and an iterator over the rest.

        The rest ends with the last choice's GenerateEnd, or raises an ApiError mid-way; closed early (the
        client went away and Serve cancelled this request), it cancels the pool's call, and with it the engine's
        rows.
        """
        events = self.pool.options(stream=True).stream.remote(job)
        try:
            start = await self._next_event(events)
        except BaseException:
            events.cancel()
            raise

        return start, PoolStream(self, events, job.n)

    # ---- request checks ----

    def authorise(self, request: Request) -> None:
        """A 401 unless the request carries the key (when serve.auth.api_key_env sets one)."""
        refusal = bearer_refusal(request.headers.get("authorization", ""), self.key_digest)
        if refusal:
            raise refusal

    async def read(
        self, request: Request, schema: type[Body], check: Callable[[dict], None] | None = None
    ) -> Body:
        """The request's JSON body as `schema`: 401 without the key, 415 if not declared JSON, 413 over the size
        cap, 400 if not JSON (or refused by `check`), 422 if invalid."""
        self.authorise(request)
        data = await self._json(request)
        if check is not None:
            check(data)
        try:
            body = schema.model_validate(data)
        except ValidationError as err:
            where = err.errors()[0]["loc"]
            raise ApiError(422, _first_error(err), param=str(where[0]) if where else None) from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None
        refusal = limit_refusal(body, self.section.limits)
        if refusal:
            raise refusal
        return body

    async def _json(self, request: Request) -> dict:
        refusal = media_type_refusal(request.headers.get("content-type", ""))
        if refusal:
            raise refusal
        cap = self.section.limits.max_body_bytes
        length = request.headers.get("content-length", "0")
        if not length.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(length) > cap:
            raise ApiError(413, f"request body of {length} bytes is over the cap of {cap}")
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
        refusal = text_refusal(data)
        if refusal:
            raise refusal
        return data

    def new_tokens(self, asked: int | None) -> int:
        """The new tokens a request may decode: its own ask under the cap (422 over it), else the default."""
        refusal = new_tokens_refusal(asked, self.section.limits)
        if refusal:
            raise refusal
        return asked or self.section.limits.default_max_new_tokens

    # ---- routing ----

    async def route(
        self,
        request: Request,
        culture: str | None,
        text: str,
        k: int | None,
    ) -> Routed:
        """The committee for an explicit culture, else for the culture the text points to (`workers/routing.py`),
        each member with its share of the prior; the model id that names the choice (also the request's
        `expert` in the metrics); and why (`routing` in responses)."""
        routed = await self._committee(culture, text, k or self.section.routing.committee_size)
        request.state.expert = routed.model
        return routed

    async def _committee(self, culture: str | None, text: str, k: int) -> Routed:
        catalogue = await self.catalogue()
        names, loop = self.names, asyncio.get_running_loop()
        if culture is not None:
            if culture_key(culture) == BASE:
                return Routed(Committee([(BASE, 1.0)]), MODEL_PREFIX + BASE, Routing(BASE, [], BY_CULTURE))
            # Answered from the catalogue alone: an unknown name costs no pool call and waits for nothing.
            # New experts reach the catalogue on the refresh interval, or as soon as an answer shows them.
            name = names.exact(culture) or await loop.run_in_executor(self.names_thread, names.find, culture)
            if name is None:
                raise unknown_culture(culture, len(catalogue.experts))
            return Routed(self._culture(name, catalogue, k), MODEL_PREFIX + slug(name), named(name, culture))
        routing = await loop.run_in_executor(self.names_thread, read_text, text, place_index(), names)
        if routing.found is not None:
            return Routed(self._culture(routing.found, catalogue, k), MODEL_PREFIX + AUTO, routing)
        descriptors = {e.culture: e.descriptor or e.culture for e in catalogue.experts}
        temperature = self.section.routing.routing_temperature
        try:
            committee = await loop.run_in_executor(
                self.embed_thread, self.text_router.committee, text, descriptors, k, temperature
            )
        except UnknownCultureError as err:
            raise ApiError(503, str(err)) from None
        if any(is_shared(e.culture) for e in catalogue.experts):  # as a culture without an expert is answered
            committee = served_committee(committee, prior_weights(catalogue.experts))
        return Routed(committee, MODEL_PREFIX + AUTO, routing)

    def _culture(self, name: str, catalogue: protocol.Catalogue, k: int) -> Committee:
        """A known culture's committee: its expert, or its nearest experts by survey similarity."""
        experts = [e.culture for e in catalogue.experts]
        try:
            return culture_committee(
                name,
                experts,
                catalogue.similarity,
                k,
                self.section.routing.routing_temperature,
                prior_weights=prior_weights(catalogue.experts),
            )
        except UnknownCultureError as err:
            raise ApiError(404, str(err)) from None

    @staticmethod
    def members(
        committee: Committee,
        answer: protocol.OpinionAnswer | protocol.GenerateAnswer | protocol.GenerateStart,
    ) -> list[dict]:
        """A committee as responses show it: each member's culture, weight and the version that answered."""
        return [
            {"culture": c, "weight": round(w, 6), "version": answer.versions.get(c)}
            for c, w in committee.members
        ]

    async def edge_rules(self) -> EdgeRules:
        """What the edge in Serve's proxy needs to refuse requests as this router would (serve/edge.py)."""
        catalogue = await self.catalogue()
        return EdgeRules(
            version=catalogue.version,
            hosts=self.hosts,
            key_digest=self.key_digest,
            cors=bool(self.section.auth.cors_origins),
            limits=self.section.limits,
            cultures=tuple(self.names.known),
            experts=len(catalogue.experts),
        )

    # ---- endpoints ----

    async def healthz(self) -> dict:
        """Liveness only: the router answers (no key needed, nothing disclosed)."""
        return {"status": "ok"}

    async def status(self, request: Request) -> dict:
        """The router's answers by endpoint and status, and a pool replica's identity, experts version and
        batching counters (needs the key)."""
        self.authorise(request)
        pool = await self._ask("health")
        answered = {endpoint: dict(statuses) for endpoint, statuses in self.answered.items()}
        return {"status": "ok", "router": {"answered": answered}, "pool": asdict(pool)}

    async def experts(self, request: Request) -> dict:
        """The experts served (culture, version, descriptor) and the cultures answered by committees."""
        self.authorise(request)
        catalogue = await self.catalogue()
        own = {e.culture for e in catalogue.experts}
        return {
            "experts": [asdict(e) for e in catalogue.experts],
            "committee_cultures": sorted(c for c in catalogue.similarity if c not in own),
            "base_model": catalogue.base_model,
            "experts_version": catalogue.version,
        }

    async def opinion(self, request: Request) -> dict:
        """A committee's distribution over the options of one survey-style question."""
        body = await self.read(request, OpinionRequest)
        routed = await self.route(request, body.culture, body.profile or body.question, body.committee_size)
        answer: protocol.OpinionAnswer = await self._ask(
            "opinion", protocol.OpinionJob(body.question, body.options, routed.committee)
        )
        return {
            "distribution": answer.distribution,
            "committee": self.members(routed.committee, answer),
            "model": routed.model,
            "routing": routed.routing.as_dict(),
            "experts_version": answer.experts_version,
        }

    async def generate(self, request: Request) -> dict | StreamingResponse:
        """A committee's joint continuation of a prompt (greedy at temperature 0, else seeded sampling)."""
        body = await self.read(request, GenerateRequest)
        max_new_tokens = self.new_tokens(body.max_new_tokens)
        routed = await self.route(request, body.culture, body.profile or body.prompt, body.committee_size)
        job = protocol.GenerateJob(
            routed.committee,
            max_new_tokens,
            prompt=body.prompt,
            temperature=body.temperature,
            seed=body.seed,
            top_p=body.top_p,
            stop=body.stop,
        )
        if body.stream:
            start, rest = await self.stream(job)
            return StreamingResponse(self._generate_events(start, rest, routed), media_type=EVENT_STREAM)
        answer = await self.complete(job)
        [choice] = answer.choices
        return {
            "text": choice.text,
            "finish_reason": choice.finish_reason,
            "committee": self.members(routed.committee, answer),
            "model": routed.model,
            "routing": routed.routing.as_dict(),
            "experts_version": answer.experts_version,
        }

    async def _generate_events(
        self, start: protocol.GenerateStart, rest: AsyncIterator, routed: Routed
    ) -> AsyncIterator[str]:
        """/v1/generate's events: `{"token", "text"}` a token, then the answer's keys with the text held back
        (`text`, `finish_reason`, `completion_tokens`, `committee`, `model`, `experts_version`), then [DONE]."""
        try:
            async with aclosing(rest):  # closed with this stream, so that a client going away cancels it
                async for item in rest:
                    if isinstance(item, protocol.TokenPiece):
                        yield event({"token": item.token, "text": item.text})
                        continue
                    yield event(
                        {
                            "text": item.text,
                            "finish_reason": item.finish_reason,
                            "completion_tokens": item.completion_tokens,
                            "committee": self.members(routed.committee, start),
                            "model": routed.model,
                            "routing": routed.routing.as_dict(),
                            "experts_version": start.experts_version,
                        }
                    )
        except ApiError as err:  # the status is sent already: the error is the stream's last event
            yield event({"error": err.message})
            return
        except Exception:  # noqa: BLE001 - a bug must still end the stream with an error event
            logger.exception("a stream failed")
            yield event({"error": "internal error while streaming"})
            return
        yield DONE
