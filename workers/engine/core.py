"""The engine core: the step loop of continuous batching, which admits and retires requests between steps.

It composes the scheduler (which waiting requests join), the KV cache of the running batch and the model
runner (the forward passes and the token picks). One `step()`:
1. drops the rows of cancelled requests and answers waiting opinions (one forward pass);
2. runs one decode forward over the running rows, feeding each the token its request picked last step;
3. prefills the newcomers that the scheduler admits, and merges their caches into the running one;
4. mixes each request's member distributions by weight, picks and streams its next token, and retires the
   requests that are done (stop token, `max_new_tokens`): they are told first, then their rows leave the cache.

Faults: an error fails the request that causes it alone. A prefill batch that raises is retried request by
request; a decode forward or the cache surgery of a retire that raises is undone, its culprit found by bisection
(trying halves of the batch on copies of their rows; on out-of-memory, the request with the most slots) and
failed, and the rest retried; a merge that raises is retried half by half. A step that fails anyway fails the
requests it holds (`_fail_held`: never a hang).

`DecodeEngine` (`workers.engine.decode_engine`) is the API over it: submitting, its thread, its health.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from workers.attention import check_layer_kinds
from workers.base_model import FrozenBase
from workers.committees import BASE
from workers.engine.kv_cache import DEFAULT_CACHE_TOKENS, RunningCache, cache_rows, row_indices, truncate
from workers.engine.model_runner import ModelRunner, stop_token_ids
from workers.engine.requests import FINISH_REASONS, Batch, FaultHook, Generation, Opinion
from workers.engine.scheduler import Scheduler, by_bank
from workers.prompts import NO_EXPERT, SoftPromptBank

logger = logging.getLogger("workers.engine")


def _part(part: str, name: str, doc: str) -> property:
    """An engine attribute that lives in one of its parts (read and set through the engine)."""
    return property(
        lambda self: getattr(getattr(self, part), name),
        lambda self, value: setattr(getattr(self, part), name, value),
        doc=doc,
    )


class EngineCore:
    """The step loop of a continuous-batching engine over one frozen base: `DecodeEngine` is its API."""

    max_tokens_per_step = _part("scheduler", "max_tokens_per_step", "Prompt tokens one step may prefill.")
    max_rows = _part("scheduler", "max_rows", "Rows (committee members) in the running batch, at most.")
    max_cache_tokens = _part("scheduler", "max_cache_tokens", "The cache budget, in slots.")
    max_wait_steps = _part("scheduler", "max_wait_steps", "Steps a request waits before nothing passes it.")
    per_expert = _part("runner", "per_expert", "Opinions: one forward per expert (benchmarks only).")
    letter_ids = _part("runner", "letter_ids", "The option letters' token ids.")
    slot_steps_used = _part("kv", "slot_steps_used", "Cache slots (rows x width) summed over decode steps.")
    slot_steps_needed = _part("kv", "slot_steps_needed", "The slots rows hold, summed over decode steps.")
    peak_cache_slots = _part("kv", "peak_cache_slots", "The most slots one decode step held.")

    def __init__(
        self,
        base: FrozenBase,
        bank: SoftPromptBank | None,
        stop_ids: set[int] | None = None,
        max_tokens_per_step: int = 2048,
        max_rows: int = 256,
        per_expert: bool = False,
        max_cache_tokens: int = DEFAULT_CACHE_TOKENS,
        max_wait_steps: int = 16,
    ):
        check_layer_kinds(base.model.config)
        self.base, self.bank = base, bank
        self.stop_ids = stop_token_ids(base) if stop_ids is None else set(stop_ids)
        self.scheduler = Scheduler(max_tokens_per_step, max_rows, max_cache_tokens, max_wait_steps)
        self.runner = ModelRunner(base, per_expert)
        self.kv = RunningCache(self.runner.kinds)
        self.fault_hook: FaultHook | None = None
        self.step_hook: Callable[[], None] | None = None  # tests: called before each decode step, may block
        self.on_batch: Callable[[Batch], None] | None = None  # told of every forward pass (engine thread)
        self.finished: Counter[str] = Counter(dict.fromkeys(FINISH_REASONS, 0))
        self.steps = 0
        self.failure: BaseException | None = None  # the last step's uncontained error, until a step succeeds
        self._lock = self.scheduler.lock  # guards the queues; wakes the engine thread
        # The running batch: requests in row order (each `rows` rows); their rows of the cache are `kv`'s.
        self._running: list[Generation] = []
        self._taken: list = []  # what this step took off the queues: failed if the step fails
        self._logits: torch.Tensor | None = None  # this step's logits, rows x V, in row order

    @property
    def rows(self) -> int:
        """Rows in the running batch now (a committee of k members is k rows)."""
        return sum(g.rows for g in list(self._running))

    @property
    def running(self) -> int:
        """Requests in the running batch now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests (decode and opinion) submitted and not yet admitted."""
        return self.scheduler.queued

    @property
    def cache_slots(self) -> tuple[int, int]:
        """The running cache's slots now (rows x padded width) and the slots its rows need (their lengths)."""
        return self.kv.slots

    @property
    def has_work(self) -> bool:
        return bool(self._running or self.scheduler.waiting or self.scheduler.opinions)

    @property
    def _ready(self) -> bool:
        return self.scheduler.ready(bool(self._running))

    # ---- the step (the engine thread) ----

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduler step: retire cancelled, answer opinions, decode, admit newcomers. False when idle."""
        if not self._ready:
            return False
        if self._running and self.step_hook is not None:
            self.step_hook()
        self.steps += 1
        self._drop_cancelled()
        budget = self.scheduler.step_budget(self.rows)
        used, reserved = self._answer_opinions(budget)
        self._logits = self._decode_contained() if self._running else None
        if not reserved:  # an opinion that waited too long holds the cache budget: no generation joins
            self._admit(budget - used)
        if self._running:
            self._pick_and_retire(self._logits)
        self._logits, self._taken = None, []
        return True

    def run_until_done(self) -> None:
        """Step until every submitted request has finished, or waits on a hold (the synchronous way)."""
        while self.step():
            pass

    def _drop_cancelled(self) -> None:
        for g in self.scheduler.take_cancelled():
            self._finish(g, g.cancel_reason)
        for reason in FINISH_REASONS:
            self._retire(
                [g for g in self._running if g.cancel_requested and g.cancel_reason == reason], reason
            )

    def _answer_opinions(self, budget: int) -> tuple[int, bool]:
        """Answer the waiting opinions the scheduler admits, one forward per bank. Returns the tokens used and
        whether an opinion that waited too long holds the cache budget."""
        taken, used, blocked = self.scheduler.take_opinions(budget, bool(self._running), self.kv.used)
        self._taken += taken
        taken = [o for o in taken if o.future.set_running_or_notify_cancel()]  # False: its caller cancelled
        for batch in by_bank(taken):
            self._run_isolated(batch, self._opinion_batch)
        return used, blocked and not taken

    def _opinion_batch(self, opinions: list[Opinion]) -> None:
        bank = opinions[0].bank
        results = self.runner.opinions(bank, opinions)
        for opinion, result in zip(opinions, results):
            opinion.future.set_result(result)
        self._report("opinion", [(o.members, bank) for o in opinions])

    def _report(
        self, kind: str, requests: list[tuple[Sequence[tuple[int, float]], SoftPromptBank | None]]
    ) -> None:
        if self.on_batch is None or not requests:
            return
        experts = {_expert_name(e, bank) for members, bank in requests for e, _ in members}
        rows = sum(len(members) for members, _ in requests)
        try:
            self.on_batch(Batch(kind, len(requests), rows, tuple(sorted(experts))))
        except Exception:  # noqa: BLE001 - a report that fails must not fail the requests
            logger.exception("on_batch failed")

    def _run_isolated(self, items: list, run: Callable[[list], object]) -> None:
        """Run a batch; if it raises, run each item alone, so only the items that fail alone fail."""
        if not items:
            return
        try:
            run(items)
        except Exception as error:  # noqa: BLE001 - one request's failure must not fail its neighbours
            if len(items) > 1:
                for item in items:
                    self._run_isolated([item], run)
            elif isinstance(items[0], Generation):
                self._finish(items[0], "error", error)
            elif not items[0].future.done():
                items[0].future.set_exception(error)

    def _decode_contained(self) -> torch.Tensor | None:
        """Decode the running batch: rows x V logits. A forward that raises is undone, the request that makes
        it fail ends with the error, and the rest are decoded again (None if none is left)."""
        while self._running:
            widths = self.kv.widths
            try:
                logits, self.kv.mask = self._decode(self._running, self.kv.cache, self.kv.mask)
                self.kv.forget_out_of_window()
                return logits
            except Exception as error:  # noqa: BLE001 - fails the request that causes it only
                truncate(self.kv.cache, widths)  # the layers the failed forward reached hold one slot more
                culprit = self._culprit(
                    self._running,
                    error,
                    lambda part: self._decode(part, *self.kv.rows_of(self._running, part)),
                )
                self._retire([culprit], "error", error)
        return None

    def _decode(
        self, requests: list[Generation], cache: DynamicCache, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode forward over the rows of `requests` (the runner's), its slots counted."""
        self._hook(requests, "decode")
        logits, mask = self.runner.decode(requests, cache, mask)
        self.kv.count(mask)
        return logits, mask

    def _culprit(
        self, requests: list[Generation], error: BaseException, probe: Callable[[list[Generation]], object]
    ) -> Generation:
        """The request that makes a batch operation fail: found by bisection, `probe` trying each half alone
        (on copies of its rows); on out-of-memory, or when no half fails alone, the request with the most slots."""
        largest = max(requests, key=lambda g: g.rows * g.slots_per_row)
        if _out_of_memory(error):
            return largest
        while len(requests) > 1:
            half = len(requests) // 2
            for part in (requests[:half], requests[half:]):
                try:
                    probe(part)
                except Exception:  # noqa: BLE001 - the failure is in this half
                    requests = part
                    break
            else:
                return largest
        return requests[0]

    def _hook(self, requests: list[Generation], at: str) -> None:
        if self.fault_hook is not None:
            for g in requests:
                self.fault_hook(g, at)

    def _admit(self, budget: int) -> None:
        """Prefill the waiting requests the scheduler admits, one forward per bank, and merge their caches into
        the running one (their logits join the step's)."""
        taken = self.scheduler.take_newcomers(budget, self._running)
        self._taken += taken
        for same_bank in by_bank(taken):  # one prefill forward per bank (several only around a reload)
            self._run_isolated(same_bank, lambda batch: self._merge_contained(batch, *self._prefill(batch)))

    def _prefill(self, batch: list[Generation]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        self._hook(batch, "prefill")
        return self.runner.prefill(batch)

    def _merge_contained(
        self, batch: list[Generation], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor
    ) -> None:
        """Merge prefilled requests into the running batch; if that raises, merge each half alone, so that only
        a request that fails to merge alone fails (with the error)."""
        try:
            self._merge_in(batch, logits, cache, mask)
        except Exception as error:  # noqa: BLE001 - fails the request that causes it only
            if len(batch) == 1:
                self._finish(batch[0], "error", error)
                return
            half = len(batch) // 2
            for part in (batch[:half], batch[half:]):
                rows = row_indices(batch, part, mask.device)
                self._merge_contained(part, logits[rows], cache_rows(cache, rows), mask[rows])

    def _merge_in(
        self, batch: list[Generation], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor
    ) -> None:
        """Add prefilled rows to the running batch: all of it or, if anything raises, nothing."""
        self._hook(batch, "merge")
        merged_logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self.kv.add(cache, mask)  # changes nothing if it raises
        self._logits = merged_logits
        self._running += batch

    def _pick_and_retire(self, logits: torch.Tensor) -> None:
        mixed = self.runner.mix(logits, self._running)
        self._report("decode", [(g.request.members, g.bank) for g in self._running])
        # A request whose distribution is not finite draws nothing, and fails below.
        finite, tokens, logprobs = self.runner.pick(mixed, self._running)
        done: dict[str, list[Generation]] = {"stop": [], "length": []}
        failed: list[tuple[Generation, BaseException]] = []
        for i, g in enumerate(self._running):
            try:
                if not finite[i]:
                    raise FloatingPointError("the next-token distribution is not finite")
                token = tokens[i]
                if token in self.stop_ids:
                    done["stop"].append(g)
                    continue
                g.tokens.append(token)
                if logprobs[i] is not None:
                    g.logprobs.append(logprobs[i])
                g.next_token = token
                if g.listener is not None:
                    g.listener(g, token)
                if len(g.tokens) >= g.request.max_new_tokens:
                    done["length"].append(g)
            except Exception as error:  # noqa: BLE001 - fails this request only
                failed.append((g, error))
        for reason, finished in done.items():
            self._retire(finished, reason)
        for g, error in failed:
            self._retire([g], "error", error)

    def _retire(self, finished: list[Generation], reason: str, error: BaseException | None = None) -> None:
        """Tell finished requests they are done, then take their rows out of the batch and the cache."""
        if not finished:
            return
        gone = set(map(id, finished))
        before = self._running
        self._running = [g for g in before if id(g) not in gone]
        for g in finished:  # told before the cache surgery, which may fail
            self._finish(g, reason, error)
        self._keep_rows(before)

    def _keep_rows(self, before: list[Generation]) -> None:
        """Cut the cache (whose rows are those of `before`) down to the rows of the running requests. If the
        surgery raises, the request that makes it fail ends with the error, and the rest are cut again."""
        while self._running:
            try:
                self.kv.cache, self.kv.mask = self._kept(before, self._running)
                return
            except Exception as error:  # noqa: BLE001 - fails the request that causes it only
                culprit = self._culprit(self._running, error, lambda part: self._kept(before, part))
                self._running = [g for g in self._running if g is not culprit]
                self._finish(culprit, "error", error)
        self.kv.clear()

    def _kept(self, before: list[Generation], keep: list[Generation]) -> tuple[DynamicCache, torch.Tensor]:
        self._hook(keep, "retire")
        return self.kv.kept(before, keep)

    def _finish(self, g: Generation, reason: str, error: BaseException | None = None) -> None:
        g.finish_reason, g.error = reason, error
        self.finished[reason] += 1
        g.finished.set()
        if g.listener is not None:
            try:
                g.listener(g, None)
            except Exception:  # noqa: BLE001 - a listener that is gone (its event loop closed) has no one to tell
                pass

    def _fail_held(self, error: BaseException, everything: bool = False) -> None:
        """End what the engine holds with `error`: what this step took and the running batch, and with
        `everything` the waiting queues too. The cache is dropped."""
        held = [*self._taken, *self._running]
        if everything:
            held += self.scheduler.drain()
        self._running, self._taken, self._logits = [], [], None
        self.kv.clear()
        for item in held:
            if isinstance(item, Generation):
                if not item.done:
                    self._finish(item, "error", error)
            elif not item.future.done():
                item.future.set_exception(error)


def _expert_name(expert: int, bank: SoftPromptBank | None) -> str:
    return BASE if expert == NO_EXPERT else bank.cultures[expert]


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error)
