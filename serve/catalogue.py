"""The router's catalogue: the experts and survey similarity the pool serves, the newest version read, and the
culture names it knows.

One call to the pool at a time, whoever asks: callers wait for the one in flight, and requests never queue behind
a lock. Replicas may serve different versions for a while (a reload failed, or has not run yet): the catalogue
keeps the newest (by when each set was taken from its source), remembers the versions it has left behind, and
never flips back to one of them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from serve.errors import ApiError
from serve.protocol import Catalogue
from workers.cultures import CultureIndex

logger = logging.getLogger("ray.serve")
SUPERSEDED = 64  # versions left behind that are remembered


class CatalogueCache:
    """The newest catalogue read from the pool (`snapshot`) and its culture names (`names`).

    `fetch` asks the pool for its catalogue; the names are indexed on `names_thread` (off the event loop)."""

    def __init__(self, fetch: Callable[[], Awaitable[Catalogue]], names_thread: Executor):
        self.fetch, self.names_thread = fetch, names_thread
        self.snapshot: Catalogue | None = None
        # Versions older than the snapshot (answers at them come from replicas behind): never adopted again.
        self.superseded: collections.deque[str] = collections.deque(maxlen=SUPERSEDED)
        self.names = CultureIndex([])
        self.loading: asyncio.Task | None = None  # the one catalogue call in flight, shared by its waiters
        self.pending: set[asyncio.Task] = set()  # refreshes started by answers, held until done

    async def get(self, refresh: bool = False) -> Catalogue:
        """The experts and survey similarity, the newest read from the pool (read now if never, or `refresh`).

        One call to the pool at a time, whoever asks: callers wait for the one in flight, and requests never
        queue behind a lock. A replica behind the others (its reload failed, or has not run yet) answers with an
        older set: the catalogue keeps the newer one, so it never flips back.
        """
        if self.snapshot is not None and not refresh:
            return self.snapshot
        if self.loading is None:
            loading = self.loading = asyncio.get_running_loop().create_task(self._load())
            loading.add_done_callback(
                lambda _: setattr(self, "loading", None) if self.loading is loading else None
            )
        return await asyncio.shield(self.loading)

    async def _load(self) -> Catalogue:
        catalogue, current = await self.fetch(), self.snapshot
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

    async def refresh(self) -> None:
        """Read the catalogue again; a failure is logged, and the next request or tick tries again."""
        try:
            await self.get(refresh=True)
        except ApiError as err:  # the pool may be restarting
            logger.warning("catalogue refresh failed: %s", err.message)

    async def refresh_every(self, interval: float) -> None:
        """Refresh every `interval` seconds, for ever (the router's task, cancelled with it)."""
        while True:
            await asyncio.sleep(interval)
            await self.refresh()

    def follow(self, version: str | None) -> None:
        """An answer came from experts at `version`: when that is neither the snapshot's nor one left behind (a
        replica reloaded), refresh in the background."""
        if version and self.snapshot and version != self.snapshot.version and version not in self.superseded:
            task = asyncio.get_running_loop().create_task(self.refresh())
            self.pending.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self.pending.discard)
