"""`DecodeEngine`: the engine core behind its API, submitting from any thread, on its own thread.

`submit()` and `submit_opinion()` check a request (ValueError; CacheBudgetError for one that could never fit the
cache budget) and queue it; `cancel()` and `held()` may be called from any thread too. `step()` (the core's) is
the synchronous API (tests drive it step by step); `start()` runs it on the engine's own thread, off the asyncio
event loop, until `stop()`. A step that fails beyond one request fails what it held and marks the engine
unhealthy (`check_health`) until a step succeeds; a dead thread fails everything queued.

Each request is prefilled with the prompt bank it was submitted with (the engine's bank then, unless given):
after prefill a row's soft prompt lives in its KV cache, so a new bank (experts reloaded) can be swapped in
between any two steps, and running requests finish with the prompts they started on. The engine thread never
calls the tokenizer: a fast tokenizer must not be used by two threads at once.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager

from workers.committees import committee_weights
from workers.engine.core import EngineCore, logger
from workers.engine.requests import (
    CURRENT,
    CacheBudgetError,
    DecodeRequest,
    EngineBroken,
    EngineStopped,
    Generation,
    Listener,
    Opinion,
    check_members,
    check_request,
    prompt_width,
)
from workers.engine.sampling import sampler
from workers.prompts import SoftPromptBank
from workers.scoring import EncodedQuestion


class DecodeEngine(EngineCore):
    """A continuous-batching decode loop over one frozen base and one soft-prompt bank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # EngineCore's: base, bank, stop_ids and the budgets
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._died: BaseException | None = None  # what ended the engine thread, other than stop()

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
        check_members(request.members, bank)
        per_row = prompt_width(bank) + len(request.prompt_ids) + request.max_new_tokens
        self._check_budget(len(request.members), per_row, "the request")
        generation = Generation(
            next(self._ids),
            request,
            listener,
            bank,
            weights=committee_weights([w for _, w in request.members]),
            slots_per_row=per_row,
            prompt_slots=len(request.prompt_ids) + prompt_width(bank),
        )
        generation.generator = sampler(request)
        self.scheduler.enqueue(generation, self._check_running)
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
        check_members(members, bank)
        per_row = prompt_width(bank) + max(len(ids) for ids, _ in question.orders())
        self._check_budget(len(members) * len(question.orders()), per_row, "the question")
        opinion = Opinion(question, list(members), Future(), bank, per_row)
        self.scheduler.enqueue(opinion, self._check_running, opinion=True)
        return opinion.future

    def _check_budget(self, rows: int, per_row: int, what: str) -> None:
        if not self.scheduler.fits_alone(rows, per_row):
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
        self.scheduler.wake()

    def held(self) -> AbstractContextManager[None]:
        """Admit nothing new inside this block (running rows keep decoding): requests submitted meanwhile
        join the batch together when the last hold ends. The serving tests' gate uses it."""
        return self.scheduler.held()

    def check_health(self) -> None:
        """Raise EngineBroken unless the engine can step: its thread runs and its last step did not fail."""
        if self._died is not None:
            raise EngineBroken(f"the engine thread died: {self._died!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineBroken("the engine thread is not running")
        if self.failure is not None:
            raise EngineBroken(f"the engine's last step failed: {self.failure!r}")

    # ---- the engine thread ----

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
