"""Router: the HTTP ingress. It checks each request, resolves it to a committee, and asks the ExpertPool.

Errors a client can cause are 4xx with `{"error": "..."}`, and change nothing on the server; every answer,
errors included, is counted by endpoint and status. Each replica builds its FastAPI app from its config
(`__serve_build_asgi_app__`): which Host names it answers, CORS, the docs pages. The router owns the endpoints,
the per-request plumbing (Host, errors, metrics) and routing; it leans on serve/bodies.py (reading bodies),
serve/catalogue.py (the experts known), serve/pool_client.py (asking the pool) and serve/openai_api.py (the
OpenAI-compatible endpoints, which reach the router only through their `Gateway` interface).
"""

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import asdict
from operator import attrgetter

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from serve import protocol
from serve.answers import DONE, EVENT_STREAM, event, members
from serve.bodies import Body, read_body
from serve.catalogue import CatalogueCache
from serve.edge_rules import EXPERTS_VERSION_HEADER, EdgeRules
from serve.errors import ApiError, error_body
from serve.exposure import allowed_host_names, open_host_refusal, proxy_host
from serve.openai_api import OpenAIEndpoints
from serve.pool_client import PoolClient, PoolStream
from serve.request_checks import bearer_refusal, host_refusal, key_digest, new_tokens, unknown_culture
from serve.routes import add_routes
from serve.schemas import AUTO, MODEL_PREFIX, GenerateRequest, OpinionRequest
from serve.settings import ServeSection
from workers.committees import (
    BASE,
    Committee,
    TextRouter,
    culture_committee,
    prior_weights,
    served_committee,
)
from workers.cultures import UnknownCultureError, culture_key, is_shared, slug
from workers.places import place_index
from workers.routing import BY_CULTURE, Routed, Routing, named, read_text

logger = logging.getLogger("ray.serve")
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


@serve.deployment(max_constructor_retry_count=3)
@serve.ingress()
class Router:
    """Validates, routes to a committee, calls the pool, and answers in the contract's shapes."""

    async def __init__(self, pool: DeploymentHandle, section: ServeSection):
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
        # The newest catalogue read from the pool, and its names; the pool asked within the deadlines.
        self.catalogue_cache = CatalogueCache(lambda: self.pool_client.ask("catalogue"), self.names_thread)
        self.pool_client = PoolClient(pool, section, self.catalogue_cache)
        self.metrics = RouterMetrics()
        self.answered: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.openai = OpenAIEndpoints(self, section.limits, self.started)
        self.refresher = None
        if self.section.deployment.reload_interval_s > 0:
            self.refresher = asyncio.get_running_loop().create_task(
                self.catalogue_cache.refresh_every(self.section.deployment.reload_interval_s)
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
        snapshot = self.catalogue_cache.snapshot
        if status == 200 and snapshot is not None:  # the edge catches up when it sees a newer set
            response.headers[EXPERTS_VERSION_HEADER] = snapshot.version
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

    async def catalogue(self) -> protocol.Catalogue:
        """The experts and survey similarity, the newest read from the pool (serve/catalogue.py)."""
        return await self.catalogue_cache.get()

    async def complete(self, job: protocol.GenerateJob) -> protocol.GenerateAnswer:
        """A generation, whole."""
        return await self.pool_client.complete(job)

    async def stream(self, job: protocol.GenerateJob) -> tuple[protocol.GenerateStart, PoolStream]:
        """Start a streaming generation: its first event and the rest (`PoolClient.stream`)."""
        return await self.pool_client.stream(job)

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
        cap, 400 if not JSON (or refused by `check`), 422 if invalid (serve/bodies.py)."""
        self.authorise(request)
        return await read_body(request, schema, self.section.limits, check)

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
        names, loop = self.catalogue_cache.names, asyncio.get_running_loop()
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

    async def edge_rules(self) -> EdgeRules:
        """What the edge in Serve's proxy needs to refuse requests as this router would (serve/edge.py)."""
        catalogue = await self.catalogue()
        return EdgeRules(
            version=catalogue.version,
            hosts=self.hosts,
            key_digest=self.key_digest,
            cors=bool(self.section.auth.cors_origins),
            limits=self.section.limits,
            cultures=tuple(self.catalogue_cache.names.known),
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
        pool = await self.pool_client.ask("health")
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
        answer: protocol.OpinionAnswer = await self.pool_client.ask(
            "opinion", protocol.OpinionJob(body.question, body.options, routed.committee)
        )
        return {
            "distribution": answer.distribution,
            "committee": members(routed.committee, answer),
            "model": routed.model,
            "routing": routed.routing.as_dict(),
            "experts_version": answer.experts_version,
        }

    async def generate(self, request: Request) -> dict | StreamingResponse:
        """A committee's joint continuation of a prompt (greedy at temperature 0, else seeded sampling)."""
        body = await self.read(request, GenerateRequest)
        max_new_tokens = new_tokens(body.max_new_tokens, self.section.limits)
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
            "committee": members(routed.committee, answer),
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
                            "committee": members(routed.committee, start),
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
