"""What a pool replica counts: its batching counters (PoolStats, for GET /v1/status), its Prometheus series
(PoolMetrics, on Ray's metrics endpoint) and its engine's cache slots (`cache_stats`)."""

from __future__ import annotations

import collections
from collections import deque

from ray.serve.metrics import Counter, Gauge, Histogram

from workers.engine import Batch, DecodeEngine


class PoolStats:
    """Counters that show batching at work (GET /v1/status reports them)."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.largest_batch = 0
        self.most_experts_in_a_batch = 0
        self.reloads = 0
        self.reload_failures = 0  # reloads that failed (the source unreadable, or its set not loaded)
        self.reload_pending: str | None = None  # a version of the source not loaded yet: retried until it is
        self.last_good = False  # serving the last good local copy: the registry could not be read at start
        self.closed_early = 0
        self.recent: deque[dict] = deque(maxlen=16)  # the last batches: kind, requests, rows, experts
        self.calls: collections.Counter[str] = collections.Counter()  # calls taken, by method

    def record(self, batch: Batch) -> None:
        self.batches += 1
        self.rows += batch.rows
        self.largest_batch = max(self.largest_batch, batch.requests)
        self.most_experts_in_a_batch = max(self.most_experts_in_a_batch, len(batch.experts))
        self.recent.append(
            {
                "kind": batch.kind,
                "requests": batch.requests,
                "rows": batch.rows,
                "experts": list(batch.experts),
            }
        )


class PoolMetrics:
    """The pool's series on Ray's Prometheus endpoint: the engine's batches, time to first token, tokens."""

    def __init__(self) -> None:
        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        self.batch_rows = Histogram(
            "shores_batch_rows",
            "Rows (committee members) in one engine forward: an opinion batch or a decode step",
            sizes,
            tag_keys=("kind",),
        )
        self.batch_experts = Histogram(
            "shores_batch_experts", "Distinct experts in one engine forward", sizes, tag_keys=("kind",)
        )
        self.tokens = Counter("shores_generated_tokens", "Tokens generated, by expert", tag_keys=("expert",))
        self.first_token = Histogram(
            "shores_time_to_first_token_s",
            "Seconds from a generation reaching the engine to its first token, by the committee's lead expert",
            [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("expert",),
        )
        self.reload_failures = Counter(
            "shores_expert_reload_failures", "Reloads of the experts that failed (each retried with backoff)"
        )
        self.last_good = Gauge(
            "shores_experts_last_good",
            "1 while the replica serves its last good local copy of the experts: the registry could not be read",
        )

    def batch(self, batch: Batch) -> None:
        self.batch_rows.observe(batch.rows, tags={"kind": batch.kind})
        self.batch_experts.observe(len(batch.experts), tags={"kind": batch.kind})


def cache_stats(engine: DecodeEngine) -> dict[str, int]:
    """The engine's cache slots, as PoolHealth.cache reports them."""
    used, needed = engine.cache_slots
    return {
        "budget": engine.max_cache_tokens,
        "used": used,
        "needed": needed,
        "peak": engine.peak_cache_slots,
        "slot_steps_used": engine.slot_steps_used,
        "slot_steps_needed": engine.slot_steps_needed,
    }
