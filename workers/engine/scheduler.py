"""The scheduler: the waiting queues, admission between steps, the token and cache budgets, and fairness.

It decides which waiting requests join the running batch at a step; it runs nothing and holds no tensors. It
works on counts only: a waiting item is `rows` rows of `slots_per_row` cache slots once grown to their longest
(prefix, prompt and `max_new_tokens`), costing `prompt_slots` a row to prefill.

Budgets: a step prefills newcomers up to `max_tokens_per_step` tokens, less one for each running row (an empty
batch takes its first newcomer whatever it costs). The running cache is rows x padded width slots; a request is
admitted only while every running row, grown to its longest, fits `max_cache_tokens` (one that could never fit
is refused at submit). Opinions take at most half a step's token budget while generations wait, and share the
cache budget beside the running cache's slots.

Fairness: a waiting request that does not fit now lets smaller ones behind it pass, until it has waited
`max_wait_steps` steps: then nothing new is admitted past it, the batch drains, and it is admitted within
`max_wait_steps` + `max_new_tokens` steps. Ageing counts steps, never time.

`held()` admits nothing new while any hold lasts (running rows keep decoding).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Waiting(Protocol):
    """What the scheduler reads of a waiting item (a generation or an opinion)."""

    rows: int
    slots_per_row: int
    waited: int


class Scheduler:
    """The queues of waiting generations and opinions, and which of them a step admits."""

    def __init__(self, max_tokens_per_step: int, max_rows: int, max_cache_tokens: int, max_wait_steps: int):
        self.max_tokens_per_step, self.max_rows = max_tokens_per_step, max_rows
        self.max_cache_tokens, self.max_wait_steps = max_cache_tokens, max_wait_steps
        self.lock = threading.Condition()  # guards the queues and holds; wakes the engine thread
        self.waiting: deque = deque()  # generations, in submit order
        self.opinions: deque = deque()
        self.holds = 0  # while > 0, nothing new is admitted (see `held`)

    def fits_alone(self, rows: int, per_row: int) -> bool:
        """Whether `rows` rows of `per_row` slots fit the cache budget in an empty batch."""
        return rows * per_row <= self.max_cache_tokens

    def enqueue(self, item: Any, check: Callable[[], None], opinion: bool = False) -> None:
        """Queue a generation (or an opinion) after `check`, called with the lock held (it may raise), and wake
        the engine thread."""
        with self.lock:
            check()
            (self.opinions if opinion else self.waiting).append(item)
            self.lock.notify()

    def drain(self) -> list:
        """Take every queued item, generations then opinions: the queues are left empty."""
        with self.lock:
            items = [*self.waiting, *self.opinions]
            self.waiting, self.opinions = deque(), deque()
        return items

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Admit nothing new inside this block: items queued meanwhile are admitted together when the last
        hold ends."""
        with self.lock:
            self.holds += 1
        try:
            yield
        finally:
            with self.lock:
                self.holds -= 1
                self.lock.notify()

    @property
    def queued(self) -> int:
        """Items (generations and opinions) queued and not yet admitted."""
        return len(self.waiting) + len(self.opinions)

    def ready(self, running: bool) -> bool:
        """Whether a step has work now: running rows do; held newcomers wait."""
        return bool(running or (not self.holds and (self.waiting or self.opinions)))

    def step_budget(self, running_rows: int) -> int:
        """The tokens a step may prefill: each running row's decode takes one."""
        return self.max_tokens_per_step - running_rows

    def take_cancelled(self) -> list:
        """Take the waiting generations whose cancel was asked, in queue order."""
        with self.lock:
            cancelled = [g for g in self.waiting if g.cancel_requested]
            for g in cancelled:
                self.waiting.remove(g)
        return cancelled

    def _take(self, queue: deque, fits: Callable[[Any], bool]) -> tuple[list, bool]:
        """Take the waiting items that `fits` (called in queue order, told of each taken), skipping those that
        do not; an item that does not fit after waiting `max_wait_steps` steps stops the scan, so nothing passes
        it. Returns the items taken and whether one stopped the scan."""
        taken, left, blocked = [], deque(), False
        with self.lock:
            while queue:
                item = queue.popleft()
                if not blocked and fits(item):
                    taken.append(item)
                    continue
                blocked = blocked or item.waited >= self.max_wait_steps
                item.waited += 1
                left.append(item)
            queue.extend(left)
        return taken, blocked

    def take_opinions(self, budget: int, running: bool, cache_slots: int) -> tuple[list, int, bool]:
        """The waiting opinions that fit in one forward: the step's token `budget` (at least one; at most half
        of it while generations wait) and the cache budget beside the running cache's `cache_slots` now.

        Returns the opinions taken, the tokens they use and whether one that waited too long stopped the scan."""
        if self.holds:
            return [], 0, False
        if self.waiting:
            budget //= 2  # generations wait too: they get the other half
        free = self.max_cache_tokens - cache_slots
        used, rows, longest = 0, 0, 0

        def fits(opinion: Waiting) -> bool:
            nonlocal used, rows, longest
            cost = opinion.rows * opinion.slots_per_row
            alone = not rows and not running
            slots = (rows + opinion.rows) * max(longest, opinion.slots_per_row)
            if not alone and ((rows and used + cost > budget) or slots > free):
                return False
            used, rows, longest = used + cost, rows + opinion.rows, max(longest, opinion.slots_per_row)
            return True

        taken, blocked = self._take(self.opinions, fits)
        return taken, used, blocked

    def take_newcomers(self, budget: int, running: list[Waiting]) -> list:
        """The waiting generations that fit the step's token `budget`, the row cap and the cache budget beside
        the `running` requests, grown to their longest."""
        if self.holds:
            return []
        used, rows = 0, sum(g.rows for g in running)
        longest = max((g.slots_per_row for g in running), default=0)
        first = True

        def fits(g: Any) -> bool:
            nonlocal used, rows, longest, first
            cost = g.rows * g.prompt_slots
            alone = not rows  # an empty batch takes any request that fits alone (all do: see submit)
            # Over the token budget only as the step's one newcomer, once it waited its turn.
            over_budget = used + cost > budget and not (first and (alone or g.waited >= self.max_wait_steps))
            grown = (rows + g.rows) * max(longest, g.slots_per_row)
            if not alone and (over_budget or rows + g.rows > self.max_rows or grown > self.max_cache_tokens):
                return False
            used, rows, longest, first = used + cost, rows + g.rows, max(longest, g.slots_per_row), False
            return True

        taken, _ = self._take(self.waiting, fits)
        return taken


def by_bank(items: list) -> list[list]:
    """Consecutive runs of items (requests, opinions) that share a bank, in order: one forward each."""
    runs: list[list] = []
    for item in items:
        if runs and runs[-1][0].bank is item.bank:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs
