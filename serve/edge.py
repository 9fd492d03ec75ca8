"""The edge: refusals answered inside Serve's HTTP proxy, before a request is handed to the router.

Each request the proxy hands to the router costs about 3 ms of CPU in the proxy and as much again in the
router, whatever the answer. So a flood of requests that the router only refuses takes the CPU the engine decodes
on. The edge answers these refusals in the proxy itself, for a fraction of that (docs/benchmarks.md):
- a Host header not served here (400, 421);
- a missing or wrong key (401);
- a body not declared as JSON (415);
- an unknown culture on /v1/opinion and /v1/generate (404).

It refuses only what the router would refuse, with the router's status and words. It runs the router's own
checks (serve/request_checks.py) on rules the router gives it (`Router.edge_rules`, serve/edge_rules.py): the
edge asks the router, and the router knows nothing of the edge. It hands on everything
else, including every request it cannot judge: no rules yet, a body over the size cap, invalid JSON, a
browser's cross-origin request when CORS is on. The router keeps every check: the edge is a shortcut, never the
authority.

The rules are asked for every REFRESH_S seconds, and at once when an answer passing through carries a newer
experts version (the X-Shores-Experts-Version header). So a client that has seen a new expert in an answer is
never refused it here; a request for a culture published since the last refresh can be refused for up to
REFRESH_S.

`shores serve` installs the edge through Ray's hook for proxy middlewares: EDGE_ENV names `middlewares` before
Ray starts. A cluster started with `ray start` sets that variable itself (cluster.yaml). Its refusals are counted
in Ray's metrics as `shores_edge_refusals`, by endpoint and status, and carry the header X-Shores-Edge: refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import logging
import time

from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware

from serve.edge_rules import EXPERTS_VERSION_HEADER, EdgeRules
from serve.errors import ApiError, error_body
from serve.request_checks import (
    bearer_refusal,
    host_refusal,
    limit_refusal,
    media_type_refusal,
    text_refusal,
    unknown_culture,
)
from serve.routes import APP_NAME
from serve.schemas import MAX_NAME_CHARS, GenerateRequest, OpinionRequest
from workers.cultures import BASE, CultureIndex, culture_key

logger = logging.getLogger("ray.serve")

# Ray's hook: the import path of a callable that returns the proxy's middlewares.
EDGE_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
EDGE_IMPORT_PATH = "serve.edge:middlewares"
EDGE_HEADER = "x-shores-edge"  # on the edge's refusals: "refused"
REFRESH_S = 1.0
MAX_HOLD_S = 5.0  # the longest a refusal is held (see RefusalPace)
MAX_CLIENTS = 10_000  # client addresses whose refusal rate is tracked
ROUTED: dict[str, type[BaseModel]] = {"/v1/opinion": OpinionRequest, "/v1/generate": GenerateRequest}


def middlewares() -> list[Middleware]:
    """What Ray's proxy calls (through EDGE_ENV) for the middlewares to run in front of it."""
    return [Middleware(Edge, app_name=APP_NAME)]


class Edge:
    """The ASGI middleware in Serve's proxy: answers the refusals it can judge, hands on the rest."""

    def __init__(self, app, app_name: str = APP_NAME):
        self.app, self.app_name = app, app_name
        self.rules: EdgeRules | None = None
        self.index = CultureIndex([])
        self.loading: asyncio.Task | None = None  # the one rules call in flight
        self.refresher: asyncio.Task | None = None
        self.handle = None
        self.refusals = None  # the metric, made at the first refusal (Ray is up in the proxy by then)
        self.failing = False  # the last rules call failed (warned once until one succeeds)
        self.pace = RefusalPace()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.refresher is None:  # the proxy's event loop runs by the first request
            loop = asyncio.get_running_loop()
            self.refresher = loop.create_task(self._refresh_every(), context=contextvars.Context())
        schema = ROUTED.get(scope["path"]) if scope["method"] == "POST" else None
        rules = self.rules
        if schema is not None and rules is not None:
            headers: dict[str, str] = {}
            for name, value in scope["headers"]:  # the first of a repeated header, as the router reads it
                headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
            if not (rules.cors and "origin" in headers):
                refusal, messages = await self._judge(schema, rules, headers, receive)
                if refusal is not None:
                    client = scope["client"][0] if scope.get("client") else ""
                    wait = self.pace.wait(client, rules.limits.edge_refusals_per_s, time.monotonic())
                    if wait > 0:  # a client refused too often: its answer waits its turn (see RefusalPace)
                        await asyncio.sleep(wait)
                    return await self._refuse(scope["path"], refusal, send)
                receive = _replay(messages, receive)
        await self.app(scope, receive, self._watching(send))

    async def _judge(
        self, schema: type[BaseModel], rules: EdgeRules, headers: dict[str, str], receive
    ) -> tuple[ApiError | None, list[dict]]:
        """The router's refusal of this request if the edge can tell it, and the body messages read for it."""
        refusal = (
            host_refusal(headers.get("host"), rules.hosts)
            or bearer_refusal(headers.get("authorization", ""), rules.key_digest)
            or media_type_refusal(headers.get("content-type", ""))
        )
        if refusal is not None:
            return refusal, []
        length = headers.get("content-length", "")
        if not length.isdigit() or int(length) > rules.limits.max_body_bytes:
            return None, []  # the router answers its 413 (or reads a chunked body) itself
        messages, raw = [], bytearray()
        while True:
            message = await receive()
            messages.append(message)
            raw += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None, messages  # the router's 400
        culture = data.get("culture") if isinstance(data, dict) else None
        if not isinstance(culture, str) or len(culture) > MAX_NAME_CHARS or text_refusal(data) is not None:
            return None, messages  # no name, or one the router refuses otherwise (422, 400)
        if culture_key(culture) == BASE or self.index.find(culture) is not None:  # bounded by the length cap
            return None, messages  # a name the router resolves: its answer, not a refusal here
        # An unknown name: refused here only if the router would get that far (a valid body within the caps).
        try:
            body = schema.model_validate(data)
        except (ValidationError, RecursionError):
            return None, messages  # the router's 422
        if limit_refusal(body, rules.limits) is not None:
            return None, messages
        return unknown_culture(culture, rules.experts), messages

    async def _refuse(self, path: str, refusal: ApiError, send) -> None:
        body = json.dumps(
            error_body(path, refusal.status, refusal.message), ensure_ascii=False, separators=(",", ":")
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (EDGE_HEADER.encode(), b"refused"),  # who answered, for operators and tests
        ]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if self.refusals is None:
            from ray.util.metrics import Counter

            self.refusals = Counter(
                "shores_edge_refusals",
                "Requests refused in Serve's proxy, before the router",
                tag_keys=("endpoint", "status"),
            )
        self.refusals.inc(tags={"endpoint": path, "status": str(refusal.status)})

    def _watching(self, send):
        """`send`, that first catches up with the router when an answer shows a newer experts version."""
        header = EXPERTS_VERSION_HEADER.encode()

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start" and self.rules is not None:
                version = next((v for k, v in message.get("headers", ()) if k.lower() == header), None)
                if version is not None and version.decode("latin-1") != self.rules.version:
                    await self.refresh(version.decode("latin-1"))
            await send(message)

        return watched

    async def refresh(self, version: str | None = None) -> None:
        """Ask the router for its rules; callers share the call in flight. On failure the old rules stay.

        With `version` (seen in an answer), a call in flight that returns another version is followed by one
        more: it may have been sent before the router had that version.
        """
        for _ in range(2):
            if self.loading is None or self.loading.done():
                # A context of its own: one copied from a request (as in `send`) would make Serve take the call
                # for that HTTP request.
                loop = asyncio.get_running_loop()
                self.loading = loop.create_task(self._load(), context=contextvars.Context())
            await asyncio.shield(self.loading)
            if version is None or (self.rules is not None and self.rules.version == version):
                return

    async def _load(self) -> None:
        from ray import serve

        try:
            if self.handle is None:
                self.handle = serve.get_deployment_handle("Router", self.app_name)
            rules: EdgeRules = await self.handle.edge_rules.remote()
        except Exception as err:  # noqa: BLE001 - no router yet, or it is being replaced: hand everything on
            if not self.failing:
                logger.warning("the edge cannot read the router's rules (%s); requests go to the router", err)
            self.failing = True
            return
        self.failing = False
        if self.rules is None or rules.cultures != self.rules.cultures:
            self.index = CultureIndex(rules.cultures)
        self.rules = rules

    async def _refresh_every(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_S)


class RefusalPace:
    """When each client address may get its next refusal: `rate` a second, after a burst of a second's worth.

    A tarpit: a client that floods bad requests and waits for each answer (as most do) then runs at `rate`,
    and a flood costs the proxy `rate` refusals a second, whatever its clients could send. Good requests are
    never held.
    """

    def __init__(self, max_clients: int = MAX_CLIENTS):
        self.max_clients = max_clients
        self.due: collections.OrderedDict[str, float] = collections.OrderedDict()  # the least recent first

    def wait(self, client: str, rate: float, now: float) -> float:
        """Seconds this refusal waits (at most MAX_HOLD_S); 0 with `rate` 0 (no limit)."""
        if rate <= 0:
            return 0.0
        burst = 1.0  # seconds of refusals at `rate` answered at once
        due = max(self.due.pop(client, now), now)  # when its next refusal would be due with no burst
        self.due[client] = min(due + 1 / rate, now + MAX_HOLD_S + burst)
        while len(self.due) > self.max_clients:
            self.due.popitem(last=False)
        return min(max(0.0, due - now - burst), MAX_HOLD_S)


def _replay(messages: list[dict], receive):
    """`receive`, that first gives back the messages the edge read."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed
