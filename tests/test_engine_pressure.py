"""The engine under pressure: a cache budget, no head-of-line blocking, faults contained to their request."""

import threading

import pytest
import torch

from tests.conftest import PROMPTS, token_ids
from tests.test_engine import _requests, _static
from workers.engine import CacheBudgetError, DecodeEngine, DecodeRequest, EngineBroken, EngineStopped
from workers.scoring import encode_question


def _slots(request: DecodeRequest, bank) -> int:
    """The cache slots a request's rows take once grown to their longest."""
    return len(request.members) * (bank.num_virtual_tokens + len(request.prompt_ids) + request.max_new_tokens)


def test_a_request_over_the_cache_budget_is_refused_while_its_neighbours_finish(tiny_base, bank):
    requests = _requests(tiny_base)
    budget = max(_slots(r, bank) for r in requests)
    engine = DecodeEngine(tiny_base, bank, set(), max_cache_tokens=budget)
    generations = [engine.submit(r) for r in requests[:2]]
    engine.step()
    huge = DecodeRequest(requests[0].prompt_ids * 3, [(0, 0.5), (1, 0.5)], max_new_tokens=8)
    with pytest.raises(
        CacheBudgetError, match=f"needs {_slots(huge, bank)} cache slots, over the cache budget"
    ):
        engine.submit(huge)
    question = encode_question(tiny_base.tokenizer, PROMPTS[0] * 20, ["Yes", "No"])
    with pytest.raises(CacheBudgetError, match=f"over the cache budget of {budget}"):
        engine.submit_opinion(question, [(0, 0.5), (1, 0.5)])
    generations += [engine.submit(r) for r in requests[2:]]
    used, needed = engine.cache_slots
    assert used == engine.rows * engine.kv.mask.shape[1] and 0 < needed <= used
    while engine.step():
        assert engine.cache_slots[0] <= budget  # never over the budget, whatever joins
    assert [g.decoded() for g in generations] == [_static(tiny_base, bank, r) for r in requests]
    assert engine.slot_steps_needed <= engine.slot_steps_used and 0 < engine.peak_cache_slots <= budget


def test_a_request_that_does_not_fit_lets_smaller_ones_pass_and_is_admitted_within_the_bound(tiny_base, bank):
    ids = token_ids(tiny_base, PROMPTS[0])
    running = DecodeRequest(ids, [(0, 1.0)], max_new_tokens=14)
    big = DecodeRequest(ids * 4, [(0, 0.4), (1, 0.3), (2, 0.3)], max_new_tokens=4)
    short = DecodeRequest(token_ids(tiny_base, PROMPTS[1]), [(1, 1.0)], max_new_tokens=2)
    # The big one fits alone, not beside the running request; the short ones fit beside that one.
    engine = DecodeEngine(tiny_base, bank, set(), max_cache_tokens=_slots(big, bank) + 1, max_wait_steps=3)
    first = engine.submit(running)
    engine.step()
    waiting = engine.submit(big)
    shorts = [engine.submit(short)]
    steps = 0
    while not waiting.tokens:
        engine.step()
        steps += 1
        if steps == 1:  # the big one does not hold up the short one queued behind it
            assert shorts[0].tokens and not waiting.tokens
        shorts.append(engine.submit(short))  # a stream of short requests that would starve it
    # Admitted once it waited max_wait_steps steps and the running batch drained (at most max_new_tokens).
    assert steps <= engine.max_wait_steps + running.max_new_tokens + 1
    engine.run_until_done()
    assert first.decoded() == _static(tiny_base, bank, running)
    assert waiting.decoded() == _static(tiny_base, bank, big)
    assert all(g.decoded() == _static(tiny_base, bank, short) for g in shorts)


def test_opinions_and_generations_share_the_step_budget(tiny_base, bank):
    question = encode_question(tiny_base.tokenizer, PROMPTS[0], ["Yes", "No"])
    request = _requests(tiny_base)[0]
    # Room for a few opinions a step: alone they would take it all.
    budget = 4 * (len(question.input_ids) + bank.num_virtual_tokens)
    engine = DecodeEngine(tiny_base, bank, set(), max_tokens_per_step=budget)
    opinions = [engine.submit_opinion(question, [(0, 1.0)]) for _ in range(8)]
    generation = engine.submit(request)
    engine.step()
    answered = sum(f.done() for f in opinions)
    assert generation.tokens and 1 <= answered <= 2  # half the budget each, while both wait
    engine.run_until_done()
    assert all(f.done() for f in opinions) and generation.decoded() == _static(tiny_base, bank, request)


@pytest.mark.parametrize("stage", ["decode", "merge", "retire", "out of memory"])
def test_a_failing_step_fails_only_the_request_that_causes_it(tiny_base, bank, stage):
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set())
    running = engine.submit(requests[2])
    engine.step()  # one running already: the others merge into its cache
    generations = [running, *(engine.submit(r) for r in requests[:2]), engine.submit(requests[3])]
    poison = generations[1]  # 14 tokens: it is kept in the cache when its neighbours finish
    at = "decode" if stage == "out of memory" else stage
    if stage == "out of memory":  # the request with the most cache slots is the one dropped
        poison = max(generations, key=lambda g: g.rows * g.slots_per_row)

    def fault(generation, where):
        # decode: its third step; merge: joining the batch; retire: kept when the first neighbour leaves.
        if where == at and generation is poison and (at != "decode" or len(generation.tokens) == 2):
            if stage == "out of memory":
                raise torch.OutOfMemoryError("out of memory (injected)")
            raise RuntimeError(f"poisoned at {stage}")

    engine.fault_hook = fault
    engine.run_until_done()
    assert poison.finish_reason == "error" and isinstance(poison.error, RuntimeError)
    for generation in generations:
        if generation is not poison:  # the same answer as alone, and told before the cache surgery
            assert generation.decoded() == _static(tiny_base, bank, generation.request)
    assert engine.finished["error"] == 1 and engine.rows == 0 and not engine.has_work


def test_a_step_that_fails_whole_fails_what_it_holds_and_the_engine_reports_it(tiny_base, bank):
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set()).start()
    try:
        engine.check_health()
        fail_next = threading.Event()

        def step_hook():  # before a decode step, on the engine thread: fails that step whole, once
            if fail_next.is_set():
                fail_next.clear()
                raise RuntimeError("a bug in a step")

        fail_next.set()
        engine.step_hook = step_hook
        held = [engine.submit(r) for r in requests[:2]]
        for g in held:
            assert g.finished.wait(60)
        # The first step had nothing running (no hook); the second failed whole: an error, never a hang.
        assert [g.finish_reason for g in held] == ["error", "error"]
        with pytest.raises(EngineBroken, match="a bug in a step"):
            engine.check_health()
        after = engine.submit(requests[1])
        assert after.finished.wait(60) and after.decoded() == _static(tiny_base, bank, requests[1])
        engine.check_health()  # a step succeeded since
    finally:
        engine.stop()


class _ThreadKilled(BaseException):
    """What no step catches: the engine thread ends."""


def test_a_dead_engine_thread_fails_what_it_holds_refuses_new_requests_and_is_unhealthy(tiny_base, bank):
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set())

    def kill(generation, where):
        if where == "decode":
            raise _ThreadKilled()

    engine.fault_hook = kill
    with engine.held():
        engine.start()
        held = [engine.submit(r) for r in requests]
    for g in held:
        assert g.finished.wait(60)
    assert all(isinstance(g.error, EngineStopped) for g in held)
    with pytest.raises(EngineBroken, match="thread died"):
        engine.check_health()
    with pytest.raises(EngineStopped, match="thread died"):
        engine.submit(requests[0])
    engine.stop()
