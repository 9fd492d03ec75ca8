"""A pool replica's experts: the set it serves, and how that set follows the source.

`ExpertSets` loads the source's experts when the replica starts (or, while the registry cannot be read, the
registry source's last good local copy, and says so: a warning, the `shores_experts_last_good` gauge,
`/v1/status`), then watches the source and reloads it, without a restart, when its version changes. A set is
swapped in whole (`ExpertSet`), so a request resolved against one version is answered by it. A reload that fails
is retried with backoff until it loads, so replicas converge on the source's version. The fault hook
($SHORES_RELOAD_FAULT) makes one replica's reloads fail, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.pool_metrics import PoolMetrics, PoolStats
from workers.base_model import FrozenBase
from workers.expert_file import Expert
from workers.expert_store import DirectorySource, ExpertSnapshot, RegistryError, RegistrySource, Similarity
from workers.prompts import SoftPromptBank, bank_from_experts

logger = logging.getLogger("ray.serve")
# A fault hook (tests, bench/serve_load.py): names a file: while it exists, the first replica to reload after it appeared fails every reload (tests: one
# replica held behind the others at an exact point, until the file is removed).
RELOAD_FAULT_ENV = "SHORES_RELOAD_FAULT"
BACKOFF_CAP = 32  # a failing reload is retried after 2, 4, 8, ... and at most 32 reload intervals


@dataclass
class ExpertSet:
    """One loaded version of the experts: swapped in whole, so a batch never sees half of a reload."""

    version: str
    experts: list[Expert]
    versions: dict[str, str]  # culture -> the version of its expert that answers
    similarity: Similarity
    since: float  # when it was taken from the source: the router follows the newest set, never an older one
    bank: SoftPromptBank | None = None
    index: dict[str, int] = field(default_factory=dict)


class ExpertSets:
    """The set a replica serves now (`current`), loaded from `source` at start and reloaded when it changes.

    `on_reload` is called with each set reloaded, as it becomes `current` (the pool hands its bank to the engine).
    """

    def __init__(
        self,
        source: DirectorySource | RegistrySource,
        base: FrozenBase,
        stats: PoolStats,
        metrics: PoolMetrics,
    ):
        self.source, self.base, self.stats, self.metrics = source, base, stats, metrics
        self.on_reload: Callable[[ExpertSet], None] = lambda loaded: None
        self.current = self._first_load()

    def _index(self, loaded: ExpertSnapshot) -> ExpertSet:
        bank = bank_from_experts(loaded.experts, self.base.device) if loaded.experts else None
        index = {e.meta.culture: i for i, e in enumerate(loaded.experts)}
        return ExpertSet(
            loaded.version, loaded.experts, loaded.versions, loaded.similarity, loaded.since, bank, index
        )

    def _first_load(self) -> ExpertSet:
        """The source's experts; while the registry cannot be read, its last good local copy (if any)."""
        try:
            loaded = self._index(self.source.load(self.base))
        except RegistryError as err:
            kept = self.source.last_good(self.base)
            if kept is None:
                raise
            logger.warning("serving the last good copy of experts %s: %s", kept.version, err)
            self._serving_last_good(True)
            return self._index(kept)
        self._serving_last_good(False)
        return loaded

    def _serving_last_good(self, stale: bool) -> None:
        self.stats.last_good = stale
        self.metrics.last_good.set(int(stale))

    async def watch(self, interval: float) -> None:
        """Look for a new version of the experts every `interval` seconds and load it, serving the old ones
        meanwhile; a reload that fails is retried with backoff (twice the wait each failure in a row, at most
        BACKOFF_CAP intervals) until it loads."""
        wait = interval
        failures = 0
        while True:
            await asyncio.sleep(wait)
            try:
                await self.reload()
                wait, failures = interval, 0
            # A registry blip or a half-written expert must not take the replica down.
            except Exception as err:
                failures += 1
                wait = interval * min(2**failures, BACKOFF_CAP)
                self.stats.reload_failures += 1
                self.metrics.reload_failures.inc()
                logger.warning(
                    "keeping experts %s: reload failed (%d in a row), retried in %g s: %s",
                    self.current.version,
                    failures,
                    wait,
                    err,
                )

    async def reload(self) -> None:
        """Load the source's current version if it is not the one served."""
        loop = asyncio.get_running_loop()
        version = await loop.run_in_executor(None, self.source.version)
        if version != self.current.version:
            self.stats.reload_pending = version
            loaded = await loop.run_in_executor(None, self._load)
            # Requests resolved from now on use the new set; those submitted already keep their bank.
            self.current = loaded
            self.on_reload(loaded)
            self.stats.reloads += 1
            logger.info("reloaded experts: version %s, %s", loaded.version, loaded.versions)
        self.stats.reload_pending = None
        if self.stats.last_good:  # the source answers again, and its set is served
            self._serving_last_good(False)

    def _load(self) -> ExpertSet:
        injected_reload_fault()
        return self._index(self.source.load(self.base))


def injected_reload_fault() -> None:
    """A fault hook: raise if $SHORES_RELOAD_FAULT names a file that exists and this replica owns.

    The first replica to reload after the file appears writes its pid into it, and owns it until it is removed:
    one replica's reloads fail while the others load (tests/test_serve_replicas.py, bench/serve_load.py). Like
    orchestrator/faults.py's $SHORES_FAULT, it does nothing unless the variable is set (docs/serving.md).
    """
    path = os.environ.get(RELOAD_FAULT_ENV)
    if not path:
        return
    try:
        fault = open(os.open(path, os.O_RDWR), "r+")  # never created here: removed, the fault is over
    except FileNotFoundError:
        return
    with fault:
        fcntl.flock(fault, fcntl.LOCK_EX)  # one owner, whichever replica comes first
        owner = fault.read().strip()
        if not owner:
            owner = str(os.getpid())
            fault.write(owner)
    if owner == str(os.getpid()):
        raise OSError(f"reload failed on purpose (${RELOAD_FAULT_ENV} {path})")
