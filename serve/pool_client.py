"""Asking the ExpertPool: each call within the request deadline, and each failure as the one error its client
gets (`pool_error`), never a replay. Streams (`PoolStream`) hold the deadline for each event.

An answer from experts newer than the catalogue's makes the catalogue catch up (`CatalogueCache.follow`); a 409
(a committee naming experts the replica has not loaded: a reload raced the request) refreshes it, so that the
client's retry is routed to the experts loaded now.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from serve import protocol
from serve.catalogue import CatalogueCache
from serve.errors import ApiError
from serve.settings import ServeSection
from workers.engine import EngineStopped

logger = logging.getLogger("ray.serve")


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


class PoolClient:
    """Calls to the pool deployment (`pool`), each within serve.deployment.request_timeout_s."""

    def __init__(self, pool: DeploymentHandle, section: ServeSection, catalogue: CatalogueCache):
        self.pool, self.section, self.catalogue = pool, section, catalogue

    async def ask(self, method: str, *args):
        """Call the pool once, within the request deadline; every failure is one JSON error, never a replay."""
        response = getattr(self.pool, method).remote(*args)
        async with self._pool_errors(response):
            result = await asyncio.wait_for(response, self.section.deployment.request_timeout_s)
        self.catalogue.follow(getattr(result, "experts_version", None))
        return result

    async def next_event(self, events: DeploymentResponseGenerator):
        """The next event of a streaming pool call, within the request deadline (the same errors as `ask`).

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
                await self.catalogue.get(refresh=True)
            elif answer.status == 500 or answer.status == 503:
                logger.warning("pool call failed, not retried: %s", err)
            raise answer from None

    async def complete(self, job: protocol.GenerateJob) -> protocol.GenerateAnswer:
        """A generation, whole."""
        return await self.ask("generate", job)

    async def stream(self, job: protocol.GenerateJob) -> tuple[protocol.GenerateStart, PoolStream]:
        """Start a streaming generation: its first event (errors in the request are raised here, as ApiErrors,
        before any response is sent) and an iterator over the rest.

        The rest ends with the last choice's GenerateEnd, or raises an ApiError mid-way; closed early (the
        client went away and Serve cancelled this request), it cancels the pool's call, and with it the engine's
        rows.
        """
        events = self.pool.options(stream=True).stream.remote(job)
        try:
            start = await self.next_event(events)
        except BaseException:
            events.cancel()
            raise

        return start, PoolStream(self, events, job.n)


class PoolStream:
    """The rest of a streaming pool call, up to its last choice's end; `aclose()` cancels it unless it ended."""

    def __init__(self, client: PoolClient, events: DeploymentResponseGenerator, choices: int):
        self.client, self.events, self.left = client, events, choices

    def __aiter__(self) -> PoolStream:
        return self

    async def __anext__(self) -> protocol.TokenPiece | protocol.GenerateEnd:
        if not self.left:
            raise StopAsyncIteration
        item = await self.client.next_event(self.events)
        self.left -= isinstance(item, protocol.GenerateEnd)
        return item

    async def aclose(self) -> None:
        if self.left:
            self.events.cancel()
            self.left = 0
