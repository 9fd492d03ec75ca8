"""The engine's scheduler alone: admission order, the token, row and cache budgets, ageing. Counts only: no
model, no tensors, and every wait is counted in steps (calls), never in time."""

from dataclasses import dataclass

from workers.engine.scheduler import Scheduler, by_bank


@dataclass(eq=False)
class Item:
    """A waiting generation (or opinion) as the scheduler sees it."""

    rows: int = 1
    slots_per_row: int = 10
    prompt_slots: int = 4
    waited: int = 0
    cancel_requested: bool = False
    bank: object = None


def scheduler(tokens=100, rows=8, cache=1000, wait=3) -> Scheduler:
    return Scheduler(max_tokens_per_step=tokens, max_rows=rows, max_cache_tokens=cache, max_wait_steps=wait)


def queued(s: Scheduler, *items: Item, opinion: bool = False) -> list[Item]:
    for item in items:
        s.enqueue(item, lambda: None, opinion=opinion)
    return list(items)


def test_newcomers_are_admitted_in_submit_order_while_they_fit():
    s = scheduler()
    a, b, c = queued(s, Item(), Item(rows=2), Item())
    assert s.queued == 3 and s.ready(running=False)
    assert s.take_newcomers(s.step_budget(0), []) == [a, b, c]
    assert s.queued == 0 and not s.ready(running=False) and s.ready(running=True)


def test_the_token_budget_admits_one_costly_newcomer_into_an_empty_batch_only():
    s = scheduler(tokens=10)
    big, small = queued(s, Item(prompt_slots=30), Item(prompt_slots=4))
    assert s.take_newcomers(s.step_budget(0), []) == [big]  # alone: whatever it costs; the budget is spent
    assert s.take_newcomers(s.step_budget(1), [big]) == [small]
    again = queued(s, Item(prompt_slots=30))
    assert s.take_newcomers(s.step_budget(1), [big]) == [] and again[0].waited == 1  # not alone: it waits


def test_the_row_cap_and_the_cache_budget_refuse_what_does_not_fit_beside_the_running_rows():
    s = scheduler(rows=3, cache=60)
    running = [Item(rows=2, slots_per_row=10)]
    too_many_rows, too_long, fits = queued(s, Item(rows=2), Item(slots_per_row=25), Item(slots_per_row=20))
    # 3 rows grown to 20 slots fit 60; 3 rows of 25 do not; 4 rows pass the cap.
    assert s.take_newcomers(s.step_budget(2), running) == [fits]
    assert list(s.waiting) == [too_many_rows, too_long]
    assert s.fits_alone(rows=3, per_row=20) and not s.fits_alone(rows=4, per_row=20)


def test_a_big_request_lets_smaller_ones_pass_until_it_waited_max_wait_steps_then_blocks_newcomers():
    s = scheduler(cache=40, wait=3)
    running = [Item(slots_per_row=20)]
    big = queued(s, Item(rows=2, slots_per_row=20))[0]  # 3 rows x 20 > 40 beside the running one; 40 alone
    for step in range(3):
        small = queued(s, Item(slots_per_row=1))[0]  # 2 rows x 20 fit beside the running one
        assert s.take_newcomers(s.step_budget(1), running) == [small]
        assert big.waited == step + 1
    # It waited max_wait_steps steps: from now on nothing behind it is admitted, and the batch drains.
    late = queued(s, Item(slots_per_row=1))[0]
    assert s.take_newcomers(s.step_budget(1), running) == []
    assert list(s.waiting) == [big, late]
    assert s.take_newcomers(s.step_budget(0), []) == [big]  # the batch drained: it is admitted first


def test_held_admits_nothing_until_the_last_hold_ends():
    s = scheduler()
    with s.held():
        with s.held():
            item = queued(s, Item())[0]
        assert not s.ready(running=False) and s.take_newcomers(100, []) == []
        assert s.take_opinions(100, False, 0) == ([], 0, False)
    assert s.ready(running=False) and s.take_newcomers(100, []) == [item]


def test_opinions_take_half_the_budget_while_generations_wait_and_share_the_cache_budget():
    s = scheduler(cache=100)
    opinions = queued(s, *(Item(slots_per_row=10) for _ in range(4)), opinion=True)  # 10 tokens each
    queued(s, Item())  # a generation waits: the opinions get half of 40
    taken, used, blocked = s.take_opinions(40, running=False, cache_slots=0)
    assert taken == opinions[:2] and used == 20 and not blocked
    taken, used, _ = s.take_opinions(40, running=True, cache_slots=80)  # 20 slots free: two rows
    assert taken == opinions[2:] and used == 20
    long = queued(s, Item(slots_per_row=30), opinion=True)[0]
    for _ in range(3):  # it never fits beside 80 running slots: it ages, then holds the scan
        assert s.take_opinions(40, running=True, cache_slots=80) == ([], 0, False)
    assert s.take_opinions(40, running=True, cache_slots=80) == ([], 0, True) and long.waited == 4


def test_cancelled_waiting_requests_are_taken_off_the_queue_and_drain_empties_both():
    s = scheduler()
    kept, cancelled = queued(s, Item(), Item(cancel_requested=True))
    opinion = queued(s, Item(), opinion=True)[0]
    assert s.take_cancelled() == [cancelled] and list(s.waiting) == [kept]
    assert s.drain() == [kept, opinion] and s.queued == 0


def test_items_run_in_consecutive_runs_of_one_bank():
    one, two = object(), object()
    items = [Item(bank=one), Item(bank=one), Item(bank=two), Item(bank=one)]
    assert by_bank(items) == [items[:2], items[2:3], items[3:]]
