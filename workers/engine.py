"""Continuous batching: a decode loop that admits and retires requests between steps (vLLM's engine, small).

Every decode request is a committee: one row per member, each row with its own expert's soft prompt and its
own rows of one shared KV cache (left-padded, so rows of different lengths stack). One `step()`:
1. drops the rows of cancelled requests and answers waiting opinion requests (one forward pass);
2. runs one decode forward over the running rows, feeding each the token its request picked last step;
3. prefills the newcomers that fit the step's token budget and merges their caches into the running one;
4. mixes each request's member distributions by weight, picks and streams its next token, and retires the
   requests that are done (stop token, `max_new_tokens`).
An error in one request fails that request alone: a prefill batch that raises is retried request by request.

Each request is prefilled with the prompt bank it was submitted with (the engine's bank then, unless given):
after prefill a row's soft prompt lives in its KV cache, so a new bank (experts reloaded) can be swapped in
between any two steps, and running requests finish with the prompts they started on.

`step()` is the synchronous API (tests drive it step by step); `start()` runs it on the engine's own thread,
off the asyncio event loop, and `stream()`, `generate()` and `opinion()` are the asyncio API over it. The
engine thread never calls the tokenizer: a fast tokenizer must not be used by two threads at once.
"""

from __future__ import annotations

import asyncio
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
from workers.committees import BASE, committee_distributions
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
FaultHook = Callable[["Generation", str], None]  # tests: raise here to fail one request at "prefill"/"decode"
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
        self.per_expert = per_expert  # opinions: one forward per expert (benchmarks only)
        self.letter_ids = option_token_ids(base.tokenizer)  # here, so the engine thread needs no tokenizer
        self.fault_hook: FaultHook | None = None
        self.step_hook: Callable[[], None] | None = None  # tests: called before each decode step, may block
        self.on_batch: Callable[[Batch], None] | None = None  # told of every forward pass (engine thread)
        self.finished: Counter[str] = Counter(dict.fromkeys(FINISH_REASONS, 0))
        self.steps = 0
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
        total = sum(w for _, w in request.members)
        generation = Generation(
            next(self._ids), request, listener, bank, weights=[w / total for _, w in request.members]
        )
        generation.generator = sampler(request)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
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
        if not members or not sum(w for _, w in members) > 0:
            raise ValueError("a committee needs at least one member with a positive weight")
        bank = self.bank if bank is CURRENT else bank
        _check_members(members, bank)
        opinion = _Opinion(question, list(members), Future(), bank)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
            self._opinions.append(opinion)
            self._lock.notify()
        return opinion.future

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
        budget -= self._answer_opinions(budget)
        logits = None
        if self._running:
            try:
                logits = self._decode()
            except Exception as error:  # noqa: BLE001 - a failed batch forward leaves no usable cache
                self._retire(list(self._running), "error", error)
        newcomers, new_logits = self._admit(budget)
        if newcomers:
            logits = new_logits if logits is None else torch.cat([logits, new_logits])
            self._running += newcomers
        if self._running:
            self._pick_and_retire(logits)
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

    def _answer_opinions(self, budget: int) -> int:
        """Answer waiting opinion requests that fit the budget (at least one) in one forward; tokens used."""
        taken, used = [], 0
        with self._lock:
            while self._opinions and not self._holds:
                first = self._opinions[0]
                cost = len(first.members) * (len(first.question.input_ids) + _width(first.bank))
                if taken and used + cost > budget:
                    break
                opinion = self._opinions.popleft()
                if opinion.future.set_running_or_notify_cancel():  # False: its caller cancelled it
                    taken.append(opinion)
                    used += cost
        for batch in _by_bank(taken):
            self._run_isolated(batch, self._opinion_batch)
        return used

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

    def _decode(self) -> torch.Tensor:
        """One forward over the running rows, each fed its request's last picked token: rows x V logits."""
        device = self.base.device
        next_ids = torch.tensor([[g.next_token] for g in self._running for _ in range(g.rows)], device=device)
        # A new token's position is the number of slots its row attends to so far (prompt and padding aside).
        position_ids = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(next_ids), 1)], dim=1)
        out = self.base.model(
            input_ids=next_ids,
            attention_mask=self._mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kwarg(self.base.model): self._cache},
        )
        return out.logits[:, -1].float()

    def _admit(self, budget: int) -> tuple[list[Generation], torch.Tensor | None]:
        """Prefill the waiting requests that fit the token budget and the row cap, and merge their caches."""
        taken, used, rows = [], 0, self.rows
        with self._lock:
            while self._waiting and not self._holds:
                first = self._waiting[0]
                cost = first.rows * (len(first.request.prompt_ids) + _width(first.bank))
                # An empty batch always takes one request, however long, so that none waits forever.
                if (taken or self._running) and (used + cost > budget or rows + first.rows > self.max_rows):
                    break
                taken.append(self._waiting.popleft())
                used, rows = used + cost, rows + first.rows
        admitted: list[tuple[list[Generation], torch.Tensor, DynamicCache, torch.Tensor]] = []
        for same_bank in _by_bank(taken):  # one prefill forward per bank (several only around a reload)
            self._run_isolated(same_bank, lambda batch: admitted.append((batch, *self._prefill(batch))))
        if not admitted:
            return [], None
        for _, _, cache, mask in admitted:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
        newcomers = [g for batch, *_ in admitted for g in batch]
        return newcomers, torch.cat([logits for _, logits, _, _ in admitted])

    def _prefill(self, batch: list[Generation]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward over the prompts of new requests (each member a row): logits, cache and mask."""
        experts, prompts = [], []
        for g in batch:
            if self.fault_hook is not None:
                self.fault_hook(g, "prefill")
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
                if self.fault_hook is not None:
                    self.fault_hook(g, "decode")
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
        """Take finished requests' rows out of the batch and the cache, and tell their listeners."""
        if not finished:
            return
        gone = set(map(id, finished))
        row_owners = [g for g in self._running for _ in range(g.rows)]
        keep = [r for r, g in enumerate(row_owners) if id(g) not in gone]
        self._running = [g for g in self._running if id(g) not in gone]
        if keep:
            self._cache.reorder_cache(torch.tensor(keep, device=self._mask.device))
            self._mask = self._mask[keep]
            # Columns no remaining row attends to (the padding of rows that left) cost compute: cut them.
            first = int(self._mask.any(0).long().argmax())
            if first:
                self._mask = self._mask[:, first:]
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        else:
            self._cache = self._mask = None
        for g in finished:
            self._finish(g, reason, error)

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
        for g in [*self._running, *self._waiting]:
            self._finish(g, "error", EngineStopped("the engine stopped before the request finished"))
        for opinion in self._opinions:
            opinion.future.set_exception(EngineStopped("the engine stopped"))
        self._running, self._waiting, self._opinions = [], deque(), deque()
        self._cache = self._mask = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._ready:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a bug in a step must not leave requests hanging
                logger.exception("engine step failed: failing the running requests")
                running, self._running, self._cache, self._mask = self._running, [], None, None
                for g in running:
                    self._finish(g, "error", error)

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
    """The running rows and the new rows as one batch: the shorter side left-padded (masked), then stacked."""
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

    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([pad(old.keys, -2), pad(new.keys, -2)])
        old.values = torch.cat([pad(old.values, -2), pad(new.values, -2)])
    return cache, torch.cat([pad(mask, 1), pad(new_mask, 1)])
