"""Continuous batching: a decode loop that admits and retires requests between steps (vLLM's engine, small).

Every decode request is a committee: one row per member, each row with its own expert's soft prompt and its
own rows of one shared KV cache (left-padded, so rows of different lengths stack). One `step()`:
1. drops the rows of cancelled requests and answers waiting opinion requests (one forward pass);
2. runs one decode forward over the running rows, feeding each the token its request picked last step;
3. prefills the newcomers that fit the step's token budget and the cache budget, and merges their caches into
   the running one;
4. mixes each request's member distributions by weight, picks and streams its next token, and retires the
   requests that are done (stop token, `max_new_tokens`): they are told first, then their rows leave the cache.

Memory: the running cache is rows x padded width slots (left padding, prefix slots included). A request is
admitted only while every running row, grown to its longest (prompt, prefix and `max_new_tokens`), fits
`max_cache_tokens`; one that could never fit is refused at submit (CacheBudgetError). A waiting request that does
not fit now lets smaller ones behind it pass, until it has waited `max_wait_steps` steps: then nothing new is
admitted past it, the batch drains, and it is admitted within `max_wait_steps` + `max_new_tokens` steps.
Opinions take at most half a step's token budget while generations wait, and share the cache budget.

Faults: an error fails the request that causes it alone. A prefill batch that raises is retried request by
request; a decode forward or the cache surgery of a retire that raises is undone, its culprit found by bisection
(trying halves of the batch on copies of their rows; on out-of-memory, the request with the most slots) and
failed, and the rest retried; a merge that raises is retried half by half. A step that fails anyway fails the
requests it holds (never a hang) and marks the engine unhealthy (`check_health`) until a step succeeds.

Each request is prefilled with the prompt bank it was submitted with (the engine's bank then, unless given):
after prefill a row's soft prompt lives in its KV cache, so a new bank (experts reloaded) can be swapped in
between any two steps, and running requests finish with the prompts they started on.

`step()` is the synchronous API (tests drive it step by step); `start()` runs it on the engine's own thread,
off the asyncio event loop, and `stream()`, `generate()` and `opinion()` are the asyncio API over it. The
engine thread never calls the tokenizer: a fast tokenizer must not be used by two threads at once.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from workers.base_model import FrozenBase
from workers.committees import BASE, committee_distributions, committee_weights
from workers.generation import (
    Decoded,
    DecodeRequest,
    TokenLogprobs,
    cache_kwarg,
    check_request,
    is_greedy,
    mixed_distributions,
    pick_tokens,
    sampler,
    stop_token_ids,
    token_logprobs,
    with_spare_slots,
)
from workers.prefix import start_cache
from workers.prompts import NO_EXPERT, SoftPromptBank, prompted_inputs
from workers.scoring import EncodedQuestion, left_pad, option_token_ids

logger = logging.getLogger(__name__)
Listener = Callable[["Generation", "int | None"], None]  # a picked token, or None once the request is done
# Tests: called for each request of a batch at "prefill", "decode" (before the forward), "merge" (its rows joining
# the running cache) and "retire" (its rows kept in the cache surgery); raise to make that batch operation fail.
FaultHook = Callable[["Generation", str], None]
DEFAULT_CACHE_TOKENS = 32768  # a CPU replica's cache budget: ~1.5 GB of SmolLM2-135M float32 slots
CURRENT: Any = object()  # submit()'s default bank: the engine's bank at the time
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class Batch:
    """One forward pass of the engine, as reported to `on_batch`: an opinion batch or a decode step."""

    kind: str  # "opinion" or "decode"
    requests: int
    rows: int
    experts: tuple[str, ...]  # the distinct experts of its rows (`base` for the plain model), sorted


class EngineStopped(RuntimeError):
    """The engine stopped before the request finished."""


class EngineBroken(RuntimeError):
    """The engine cannot step: its thread is gone, or its last step failed beyond one request."""


class CacheBudgetError(ValueError):
    """A request whose rows could never fit the engine's cache budget, however empty the batch."""

    def __init__(self, slots: int, budget: int, what: str):
        super().__init__(f"{what} needs {slots} cache slots, over the cache budget of {budget}")
        self.slots, self.budget = slots, budget


@dataclass(eq=False)
class Generation:
    """One submitted decode request: the tokens picked so far and, once done, why it ended.

    `finish_reason` is `stop` (a stop token), `length` (max_new_tokens), `cancelled` or `error` (see `error`).
    """

    id: int
    request: DecodeRequest
    listener: Listener | None = None
    bank: SoftPromptBank | None = field(default=None, repr=False)  # the prompts it is prefilled with
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, if the request asked
    finish_reason: str | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel_requested: bool = False
    cancel_reason: str = "cancelled"  # the finish reason a cancel gives (`stop`: a stop string was met)
    # Engine state: member weights (summing to 1), the sampler, the token to feed at the next decode step.
    weights: list[float] = field(default_factory=list, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    next_token: int | None = None
    slots_per_row: int = 0  # a row's cache slots once grown to its longest: prefix, prompt, max_new_tokens
    waited: int = 0  # steps it has waited to be admitted

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    @property
    def rows(self) -> int:
        return len(self.request.members)

    def decoded(self) -> Decoded:
        """The finished result as static batching returns it; raises the request's error if it failed."""
        if self.error is not None:
            raise self.error
        return Decoded(list(self.tokens), self.finish_reason or "length")


@dataclass(eq=False)
class _Opinion:
    question: EncodedQuestion
    members: list[tuple[int, float]]
    future: Future
    bank: SoftPromptBank | None
    slots_per_row: int = 0
    waited: int = 0

    @property
    def rows(self) -> int:
        return len(self.members) * len(self.question.orders())


class DecodeEngine:
    """A continuous-batching decode loop over one frozen base and one soft-prompt bank."""

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
        if any(
            getattr(layer, "is_sliding", False) for layer in DynamicCache(config=base.model.config).layers
        ):
            raise ValueError(
                "the engine merges full-attention caches only; this model has sliding-window layers"
            )
        self.base, self.bank = base, bank
        self.stop_ids = stop_token_ids(base) if stop_ids is None else set(stop_ids)
        self.max_tokens_per_step, self.max_rows = max_tokens_per_step, max_rows
        self.max_cache_tokens, self.max_wait_steps = max_cache_tokens, max_wait_steps
        self.per_expert = per_expert  # opinions: one forward per expert (benchmarks only)
        self.letter_ids = option_token_ids(base.tokenizer)  # here, so the engine thread needs no tokenizer
        self.fault_hook: FaultHook | None = None
        self.step_hook: Callable[[], None] | None = None  # tests: called before each decode step, may block
        self.on_batch: Callable[[Batch], None] | None = None  # told of every forward pass (engine thread)
        self.finished: Counter[str] = Counter(dict.fromkeys(FINISH_REASONS, 0))
        self.steps = 0
        # Cache slots (rows x width) and the slots rows hold (their real lengths), summed over decode steps:
        # their ratio is the padding's cost. `peak_cache_slots`: the most slots one step held.
        self.slot_steps_used = self.slot_steps_needed = self.peak_cache_slots = 0
        self.failure: BaseException | None = None  # the last step's uncontained error, until a step succeeds
        self._holds = 0  # while > 0, nothing new is admitted (see `held`)
        self._ids = itertools.count()
        self._lock = threading.Condition()  # guards the queues below; wakes the engine thread
        self._waiting: deque[Generation] = deque()
        self._opinions: deque[_Opinion] = deque()
        # The running batch: requests in row order (each `rows` rows), their cache and attention mask.
        self._running: list[Generation] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._died: BaseException | None = None  # what ended the engine thread, other than stop()
        self._taken: list = []  # what this step took off the queues: failed if the step fails
        self._logits: torch.Tensor | None = None  # this step's logits, rows x V, in row order

    # ---- submitting (any thread) ----

    def submit(
        self, request: DecodeRequest, listener: Listener | None = None, bank: SoftPromptBank | None = CURRENT
    ) -> Generation:
        """Queue a decode request; it joins the running batch at a coming step. ValueError if it is invalid.

        Its members index `bank` (default: the engine's bank now).
        """
        check_request(request)
        bank = self.bank if bank is CURRENT else bank
        vocab = self.base.model.get_input_embeddings().weight.shape[0]
        if not request.prompt_ids or not all(0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
        _check_members(request.members, bank)
        per_row = _width(bank) + len(request.prompt_ids) + request.max_new_tokens
        self._check_budget(len(request.members), per_row, "the request")
        generation = Generation(
            next(self._ids),
            request,
            listener,
            bank,
            weights=committee_weights([w for _, w in request.members]),
            slots_per_row=per_row,
        )
        generation.generator = sampler(request)
        with self._lock:
            self._check_running()
            self._waiting.append(generation)
            self._lock.notify()
        return generation

    def submit_opinion(
        self,
        question: EncodedQuestion,
        members: Sequence[tuple[int, float]],
        bank: SoftPromptBank | None = CURRENT,
    ) -> Future:
        """Queue an opinion request; the future gets its committee's mixed option distribution."""
        committee_weights([w for _, w in members])
        bank = self.bank if bank is CURRENT else bank
        _check_members(members, bank)
        per_row = _width(bank) + max(len(ids) for ids, _ in question.orders())
        self._check_budget(len(members) * len(question.orders()), per_row, "the question")
        opinion = _Opinion(question, list(members), Future(), bank, per_row)
        with self._lock:
            self._check_running()
            self._opinions.append(opinion)
            self._lock.notify()
        return opinion.future

    def _check_budget(self, rows: int, per_row: int, what: str) -> None:
        if rows * per_row > self.max_cache_tokens:
            raise CacheBudgetError(rows * per_row, self.max_cache_tokens, f"{what} ({rows} rows x {per_row})")

    def _check_running(self) -> None:
        if self._stopping:
            raise EngineStopped("the engine is stopped")
        if self._died is not None:
            raise EngineStopped(f"the engine thread died ({self._died!r})")

    def cancel(self, generation: Generation, reason: str = "cancelled") -> None:
        """Cancel a request: its rows leave the batch at the next step, and it ends with `reason`
        (`cancelled`: the client went away; `stop`: its caller met a stop string in its text)."""
        generation.cancel_reason = reason
        generation.cancel_requested = True
        with self._lock:
            self._lock.notify()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Admit nothing new inside this block (running rows keep decoding): requests submitted meanwhile
        join the batch together when the last hold ends. The serving tests' gate uses it."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                self._lock.notify()

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
        return len(self._waiting) + len(self._opinions)

    @property
    def cache_slots(self) -> tuple[int, int]:
        """The running cache's slots now (rows x padded width) and the slots its rows need (their lengths)."""
        mask = self._mask
        return (0, 0) if mask is None else (mask.numel(), int(mask.sum()))

    def check_health(self) -> None:
        """Raise EngineBroken unless the engine can step: its thread runs and its last step did not fail."""
        if self._died is not None:
            raise EngineBroken(f"the engine thread died: {self._died!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineBroken("the engine thread is not running")
        if self.failure is not None:
            raise EngineBroken(f"the engine's last step failed: {self.failure!r}")

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._opinions)

    @property
    def _ready(self) -> bool:
        # Work that a step can do now: held newcomers wait, running rows do not.
        return bool(self._running or (not self._holds and (self._waiting or self._opinions)))

    # ---- the loop (one thread) ----

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduler step: retire cancelled, answer opinions, decode, admit newcomers. False when idle."""
        if not self._ready:
            return False
        if self._running and self.step_hook is not None:
            self.step_hook()
        self.steps += 1
        self._drop_cancelled()
        budget = self.max_tokens_per_step - self.rows
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
        with self._lock:
            waiting = [g for g in self._waiting if g.cancel_requested]
            for g in waiting:
                self._waiting.remove(g)
        for g in waiting:
            self._finish(g, g.cancel_reason)
        for reason in FINISH_REASONS:
            self._retire(
                [g for g in self._running if g.cancel_requested and g.cancel_reason == reason], reason
            )

    def _take(self, queue: deque, fits: Callable[[Any], bool]) -> tuple[list, bool]:
        """Take the waiting items that `fits` (called in queue order, told of each taken), skipping those that
        do not; an item that does not fit after waiting `max_wait_steps` steps stops the scan, so nothing passes
        it. Returns the items taken and whether one stopped the scan. Call with the lock held."""
        taken, left, blocked = [], deque(), False
        while queue:
            item = queue.popleft()
            if not blocked and fits(item):
                taken.append(item)
                continue
            blocked = blocked or item.waited >= self.max_wait_steps
            item.waited += 1
            left.append(item)
        queue.extend(left)
        self._taken += taken
        return taken, blocked

    def _answer_opinions(self, budget: int) -> tuple[int, bool]:
        """Answer the waiting opinions that fit in one forward: the step's token budget (at least one; at most
        half of it while generations wait) and the cache budget beside the running cache's slots now.

        Returns the tokens used and whether an opinion that waited too long holds the cache budget."""
        if self._holds:
            return 0, False
        if self._waiting:
            budget //= 2  # generations wait too: they get the other half
        free = self.max_cache_tokens - (0 if self._mask is None else self._mask.numel())
        used, rows, longest = 0, 0, 0

        def fits(opinion: _Opinion) -> bool:
            nonlocal used, rows, longest
            cost = opinion.rows * opinion.slots_per_row
            alone = not rows and not self._running
            slots = (rows + opinion.rows) * max(longest, opinion.slots_per_row)
            if not alone and ((rows and used + cost > budget) or slots > free):
                return False
            used, rows, longest = used + cost, rows + opinion.rows, max(longest, opinion.slots_per_row)
            return True

        with self._lock:
            taken, blocked = self._take(self._opinions, fits)
        taken = [o for o in taken if o.future.set_running_or_notify_cancel()]  # False: its caller cancelled
        for batch in _by_bank(taken):
            self._run_isolated(batch, self._opinion_batch)
        return used, blocked and not taken

    def _opinion_batch(self, opinions: list[_Opinion]) -> None:
        bank = opinions[0].bank
        results = committee_distributions(
            self.base,
            bank,
            [o.question for o in opinions],
            [o.members for o in opinions],
            self.per_expert,
            self.letter_ids,
        )
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
            width = self._mask.shape[1]
            try:
                logits, self._mask = self._decode(self._running, self._cache, self._mask)
                return logits
            except Exception as error:  # noqa: BLE001 - fails the request that causes it only
                _truncate(self._cache, width)  # the layers the failed forward reached hold one slot more
                culprit = self._culprit(
                    self._running, error, lambda part: self._decode(part, *self._rows_of(self._running, part))
                )
                self._retire([culprit], "error", error)
        return None

    def _decode(
        self, requests: list[Generation], cache: DynamicCache, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the rows of `requests` (their cache and mask), each fed its request's last picked
        token: rows x V logits, and the mask grown by one slot. The cache grows in place."""
        self._hook(requests, "decode")
        device = self.base.device
        next_ids = torch.tensor([[g.next_token] for g in requests for _ in range(g.rows)], device=device)
        # A new token's position is the number of slots its row attends to so far (prompt and padding aside).
        position_ids = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(len(next_ids), 1)], dim=1)
        out = self.base.model(
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kwarg(self.base.model): cache},
        )
        self.slot_steps_used += mask.numel()
        self.slot_steps_needed += int(mask.sum())
        self.peak_cache_slots = max(self.peak_cache_slots, mask.numel())
        return out.logits[:, -1].float(), mask

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

    def _rows_of(
        self, requests: list[Generation], part: list[Generation]
    ) -> tuple[DynamicCache, torch.Tensor]:
        """A copy of the cache and mask rows of `part`, out of a batch of `requests` (in row order)."""
        rows = _rows(requests, part, self._mask.device)
        return _cache_rows(self._cache, rows), self._mask[rows]

    def _hook(self, requests: list[Generation], at: str) -> None:
        if self.fault_hook is not None:
            for g in requests:
                self.fault_hook(g, at)

    def _admit(self, budget: int) -> None:
        """Prefill the waiting requests that fit the step's token budget, the row cap and the cache budget, and
        merge their caches into the running one (their logits join the step's)."""
        if self._holds:
            return
        used, rows = 0, self.rows
        longest = max((g.slots_per_row for g in self._running), default=0)
        first = True

        def fits(g: Generation) -> bool:
            nonlocal used, rows, longest, first
            cost = g.rows * (len(g.request.prompt_ids) + _width(g.bank))
            alone = not rows  # an empty batch takes any request that fits alone (all do: see submit)
            # Over the token budget only as the step's one newcomer, once it waited its turn.
            over_budget = used + cost > budget and not (first and (alone or g.waited >= self.max_wait_steps))
            grown = (rows + g.rows) * max(longest, g.slots_per_row)
            if not alone and (over_budget or rows + g.rows > self.max_rows or grown > self.max_cache_tokens):
                return False
            used, rows, longest, first = used + cost, rows + g.rows, max(longest, g.slots_per_row), False
            return True

        with self._lock:
            taken, _ = self._take(self._waiting, fits)
        for same_bank in _by_bank(taken):  # one prefill forward per bank (several only around a reload)
            self._run_isolated(same_bank, lambda batch: self._merge_contained(batch, *self._prefill(batch)))

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
                rows = _rows(batch, part, mask.device)
                self._merge_contained(part, logits[rows], _cache_rows(cache, rows), mask[rows])

    def _merge_in(
        self, batch: list[Generation], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor
    ) -> None:
        """Add prefilled rows to the running batch: all of it or, if anything raises, nothing."""
        self._hook(batch, "merge")
        merged_logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)  # changes nothing if it raises
        self._logits = merged_logits
        self._running += batch

    def _prefill(self, batch: list[Generation]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward over the prompts of new requests (each member a row): logits, cache and mask."""
        experts, prompts = [], []
        self._hook(batch, "prefill")
        for g in batch:
            experts += [e for e, _ in g.request.members]
            prompts += [g.request.prompt_ids] * g.rows
        ids, mask = left_pad(prompts, self.base.tokenizer.pad_token_id)
        device = self.base.device
        # Rows that are all the plain base model take no prompt slots, as in static batching. Every running
        # row then has its bank's width of prompt slots or none: merged caches pad on the left either way.
        bank = None if all(e == NO_EXPERT for e in experts) else batch[0].bank
        inputs = prompted_inputs(
            self.base.model, ids.to(device), mask.to(device), bank, torch.tensor(experts)
        )
        # A row with a deep prefix starts its cache with it: decoding then continues from that cache as usual.
        cache = with_spare_slots(start_cache(self.base.model, inputs))
        out = self.base.model(
            **inputs, use_cache=True, logits_to_keep=1, **{cache_kwarg(self.base.model): cache}
        )
        return out.logits[:, -1].float(), cache, inputs["attention_mask"]

    def _pick_and_retire(self, logits: torch.Tensor) -> None:
        device = logits.device
        owner = torch.tensor([i for i, g in enumerate(self._running) for _ in range(g.rows)], device=device)
        weight = torch.tensor([w for g in self._running for w in g.weights], device=device)
        temperature = torch.tensor(
            [
                0.0 if is_greedy(g.request) else g.request.temperature
                for g in self._running
                for _ in g.weights
            ],
            device=device,
        )
        mixed = mixed_distributions(logits, owner, weight, temperature, len(self._running))
        self._report("decode", [(g.request.members, g.bank) for g in self._running])
        # One check and one pick for the whole batch (not a tensor op per request); a request whose
        # distribution is not finite draws nothing, and fails below.
        finite = torch.isfinite(mixed).all(-1).tolist()
        generators = [g.generator if ok else None for g, ok in zip(self._running, finite)]
        tokens = pick_tokens(mixed, generators, [g.request.top_p for g in self._running])
        logprobs = token_logprobs(
            mixed, tokens, [g.request.logprobs if ok else None for g, ok in zip(self._running, finite)]
        )
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
                self._cache, self._mask = self._kept(before, self._running)
                return
            except Exception as error:  # noqa: BLE001 - fails the request that causes it only
                culprit = self._culprit(self._running, error, lambda part: self._kept(before, part))
                self._running = [g for g in self._running if g is not culprit]
                self._finish(culprit, "error", error)
        self._cache = self._mask = None

    def _kept(self, before: list[Generation], keep: list[Generation]) -> tuple[DynamicCache, torch.Tensor]:
        """The cache and mask of `keep`'s rows only, as new tensors (the running cache is unchanged until
        they are assigned), less the columns that no row kept attends to (the padding of rows that left)."""
        self._hook(keep, "retire")
        rows = _rows(before, keep, self._mask.device)
        mask = self._mask[rows]
        first = int(mask.any(0).long().argmax())
        return _cache_rows(self._cache, rows, first), mask[:, first:]

    def _finish(self, g: Generation, reason: str, error: BaseException | None = None) -> None:
        g.finish_reason, g.error = reason, error
        self.finished[reason] += 1
        g.finished.set()
        if g.listener is not None:
            try:
                g.listener(g, None)
            except Exception:  # noqa: BLE001 - a listener that is gone (its event loop closed) has no one to tell
                pass

    # ---- the engine thread and the asyncio API ----

    def start(self) -> DecodeEngine:
        """Run the loop on the engine's own thread (off the asyncio event loop) until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; requests still waiting or running end with EngineStopped (an `error`), opinions too."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_held(EngineStopped("the engine stopped before the request finished"), everything=True)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._ready:
                        self._lock.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                    self.failure = None
                except Exception as error:  # noqa: BLE001 - a bug in a step must not leave requests hanging
                    logger.exception("engine step failed: failing the requests it held")
                    self.failure = error
                    self._fail_held(error)
        except BaseException as error:  # noqa: BLE001 - the thread ends: nothing may wait on it
            logger.exception("the engine thread died")
            with self._lock:
                self._died = error
            self._fail_held(EngineStopped(f"the engine thread died ({error!r})"), everything=True)

    def _fail_held(self, error: BaseException, everything: bool = False) -> None:
        """End what the engine holds with `error`: what this step took and the running batch, and with
        `everything` the waiting queues too. The cache is dropped."""
        held = [*self._taken, *self._running]
        if everything:
            with self._lock:
                held += [*self._waiting, *self._opinions]
                self._waiting, self._opinions = deque(), deque()
        self._running, self._taken, self._cache, self._mask, self._logits = [], [], None, None, None
        for item in held:
            if isinstance(item, Generation):
                if not item.done:
                    self._finish(item, "error", error)
            elif not item.future.done():
                item.future.set_exception(error)

    def stream(self, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT) -> TokenStream:
        """The request's tokens as an async iterator, as they are picked (call from a running event loop)."""
        return TokenStream(self, request, bank)

    async def generate(self, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT) -> Decoded:
        """The request's whole continuation; cancelled if the awaiting task is."""
        async with self.stream(request, bank) as tokens:
            async for _ in tokens:
                pass
        return tokens.generation.decoded()

    async def opinion(
        self,
        question: EncodedQuestion,
        members: Sequence[tuple[int, float]],
        bank: SoftPromptBank | None = CURRENT,
    ) -> np.ndarray:
        """A committee's mixed option distribution, answered between decode steps."""
        # A cancelled awaiting task cancels the future too (wrap_future): the engine then skips it.
        return await asyncio.wrap_future(self.submit_opinion(question, members, bank))


class TokenStream:
    """One request's tokens for `async for`; leaving early (or the task being cancelled) cancels the request."""

    def __init__(self, engine: DecodeEngine, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT):
        self._engine, self._loop, self._queue = engine, asyncio.get_running_loop(), asyncio.Queue()
        self.generation = engine.submit(request, self._deliver, bank)

    def _deliver(self, generation: Generation, token: int | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, token)  # called on the engine thread

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        try:
            token = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if token is None:
            self._queue.put_nowait(None)  # stay exhausted
            if self.generation.error is not None:
                raise self.generation.error
            raise StopAsyncIteration
        return token

    def cancel(self) -> None:
        """Cancel the request unless it is done: its rows leave the batch at the next step."""
        if not self.generation.done:
            self._engine.cancel(self.generation)

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def slot_bytes(base: FrozenBase) -> int:
    """The bytes of one cache slot of one row: a key and a value per layer."""
    config = base.model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = next(base.model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def auto_cache_tokens(base: FrozenBase, fraction: float) -> int:
    """A cache budget that fits the replica: DEFAULT_CACHE_TOKENS on a CPU; on a GPU, the slots that `fraction`
    of its free memory holds (halved: a merge copies the cache)."""
    if base.device.type != "cuda":
        return DEFAULT_CACHE_TOKENS
    free, _ = torch.cuda.mem_get_info(base.device)
    return max(1, int(free * fraction) // (2 * slot_bytes(base)))


def _width(bank: SoftPromptBank | None) -> int:
    return bank.num_virtual_tokens if bank is not None else 0


def _check_members(members: Sequence[tuple[int, float]], bank: SoftPromptBank | None) -> None:
    for expert, _ in members:
        if expert != NO_EXPERT and not (bank is not None and 0 <= expert < len(bank.cultures)):
            raise ValueError(f"no expert {expert} in the bank")


def _expert_name(expert: int, bank: SoftPromptBank | None) -> str:
    return BASE if expert == NO_EXPERT else bank.cultures[expert]


def _by_bank(items: list) -> list[list]:
    """Consecutive runs of items (requests, opinions) that share a bank, in order."""
    runs: list[list] = []
    for item in items:
        if runs and runs[-1][0].bank is item.bank:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _merge(
    cache: DynamicCache | None, mask: torch.Tensor | None, new_cache: DynamicCache, new_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """The running rows and the new rows as one batch: the shorter side left-padded (masked), then stacked.

    Every new tensor is made before `cache` changes: if this raises (out of memory), `cache` is as it was."""
    if cache is None:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    merged = [
        (
            torch.cat([pad(old.keys, -2), pad(new.keys, -2)]),
            torch.cat([pad(old.values, -2), pad(new.values, -2)]),
        )
        for old, new in zip(cache.layers, new_cache.layers)
    ]
    merged_mask = torch.cat([pad(mask, 1), pad(new_mask, 1)])
    for layer, (keys, values) in zip(cache.layers, merged):
        layer.keys, layer.values = keys, values
    return cache, merged_mask


def _rows(requests: list[Generation], part: list[Generation], device: torch.device) -> torch.Tensor:
    """The row indices of `part`'s requests in a batch of `requests` (each `rows` rows, in order)."""
    wanted = set(map(id, part))
    owners = [g for g in requests for _ in range(g.rows)]
    return torch.tensor([r for r, g in enumerate(owners) if id(g) in wanted], dtype=torch.long, device=device)


def _cache_rows(cache: DynamicCache, rows: torch.Tensor, first: int = 0) -> DynamicCache:
    """A new cache of `cache`'s rows `rows` from slot `first` on (new tensors: `cache` is unchanged)."""
    kept = copy.copy(cache)
    kept.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        new.keys, new.values = layer.keys[rows][..., first:, :], layer.values[rows][..., first:, :]
        kept.layers.append(new)
    return kept


def _truncate(cache: DynamicCache, width: int) -> None:
    """Undo a failed forward: every layer back to its first `width` slots (those it reached held one more)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error)
