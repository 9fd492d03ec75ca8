"""The continuous-batching engine: the same tokens as static batching, whatever joins, leaves or fails beside."""

import asyncio
import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from tests import engine_streams
from tests.conftest import PROMPTS, experts_of_every_kind, random_expert, token_ids
from tests.static_decoding import committee_generate
from workers.committees import committee_distributions
from workers.engine import DecodeEngine, DecodeRequest, EngineStopped
from workers.expert_file import Expert, ExpertMeta
from workers.prefix import cache_kwarg
from workers.prompts import NO_EXPERT, bank_from_experts
from workers.scoring import encode_question


def _requests(base):
    """Greedy requests of every shape: one expert, a committee, the plain base model, long and short."""
    return [
        DecodeRequest(token_ids(base, PROMPTS[0]), [(0, 1.0)], max_new_tokens=14),
        DecodeRequest(token_ids(base, PROMPTS[1]), [(1, 0.5), (2, 0.5)], max_new_tokens=3),
        DecodeRequest(token_ids(base, PROMPTS[2]), [(NO_EXPERT, 1.0)], max_new_tokens=7),
        DecodeRequest(token_ids(base, PROMPTS[2]), [(2, 0.7), (NO_EXPERT, 0.3)], max_new_tokens=10),
    ]


def _static(base, bank, request, stop_ids=frozenset()):
    return committee_generate(base, bank, [request], set(stop_ids))[0]


def test_continuous_batching_gives_the_tokens_of_static_batching(tiny_base, bank):
    requests = _requests(tiny_base)
    static = committee_generate(tiny_base, bank, requests, set())
    engine = DecodeEngine(tiny_base, bank, set())
    generations = [engine.submit(r) for r in requests]
    engine.run_until_done()
    assert [g.decoded() for g in generations] == static
    assert engine.rows == 0 and not engine.has_work


@pytest.mark.parametrize("join_at", [0, 1, 4, 9])
def test_an_answer_does_not_depend_on_the_batch_or_when_it_joined(tiny_base, bank, join_at):
    requests = _requests(tiny_base)
    sampled = DecodeRequest(
        token_ids(tiny_base, PROMPTS[1]), [(0, 0.4), (1, 0.6)], 8, temperature=0.9, seed=7
    )
    engine = DecodeEngine(tiny_base, bank, set())
    others = [engine.submit(r) for r in requests]
    for _ in range(join_at):
        engine.step()
    late = [engine.submit(requests[0]), engine.submit(sampled)]
    engine.run_until_done()
    assert late[0].decoded() == _static(tiny_base, bank, requests[0])
    assert late[1].decoded() == _static(tiny_base, bank, sampled)
    assert [g.decoded() for g in others] == [_static(tiny_base, bank, r) for r in requests]


def test_requests_join_mid_decode_and_leave_early(tiny_base, bank):
    long, short = _requests(tiny_base)[0], _requests(tiny_base)[1]  # 14 tokens, 1 row; 3 tokens, 2 rows
    engine = DecodeEngine(tiny_base, bank, set())
    first = engine.submit(long)
    for _ in range(4):
        engine.step()
    assert len(first.tokens) == 4 and engine.rows == 1
    second = engine.submit(short)
    engine.step()
    assert engine.rows == 3 and len(first.tokens) == 5 and len(second.tokens) == 1
    engine.step()
    engine.step()
    assert second.done and second.finish_reason == "length" and not first.done
    assert engine.rows == 1  # the short one's rows left the batch as soon as it was done
    engine.run_until_done()
    assert first.decoded() == _static(tiny_base, bank, long)
    assert second.decoded() == _static(tiny_base, bank, short)


def test_a_stop_token_retires_a_request_without_being_returned(tiny_base, bank):
    request = _requests(tiny_base)[0]
    free = _static(tiny_base, bank, request)
    stop = free.token_ids[5]
    engine = DecodeEngine(tiny_base, bank, {stop})
    generation = engine.submit(request)
    engine.run_until_done()
    assert generation.decoded() == _static(tiny_base, bank, request, {stop})
    assert generation.finish_reason == "stop" and stop not in generation.tokens


def test_cancel_frees_the_rows_at_the_next_step(tiny_base, bank):
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set())
    kept, cancelled = engine.submit(requests[0]), engine.submit(requests[3])
    queued = engine.submit(requests[2])
    engine.max_rows = 3  # the third waits: the batch is full
    engine.step()
    engine.step()
    assert engine.rows == 3 and len(cancelled.tokens) == 2
    engine.cancel(cancelled)
    engine.cancel(queued)
    engine.step()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) == 2
    assert queued.finish_reason == "cancelled" and queued.tokens == []
    assert engine.rows == 1 and len(kept.tokens) == 3
    engine.run_until_done()
    assert kept.decoded() == _static(tiny_base, bank, requests[0])


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_poison_request_fails_alone(tiny_base, bank, phase):
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set())
    generations = [engine.submit(r) for r in requests]
    poison = generations[1]

    def fault(generation, at):
        if generation is poison and at == phase and (at == "prefill" or len(generation.tokens) == 2):
            raise RuntimeError("poisoned")

    engine.fault_hook = fault
    engine.run_until_done()
    assert poison.finish_reason == "error" and str(poison.error) == "poisoned"
    with pytest.raises(RuntimeError, match="poisoned"):
        poison.decoded()
    for request, generation in zip(requests, generations):
        if generation is not poison:
            assert generation.decoded() == _static(tiny_base, bank, request)


def test_bad_requests_are_refused_at_submit_and_change_nothing(tiny_base, bank):
    engine = DecodeEngine(tiny_base, bank, set())
    ids = token_ids(tiny_base, PROMPTS[0])
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            engine.submit(DecodeRequest(ids, [(0, 1.0)], 4, temperature=1.0, seed=seed))
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(DecodeRequest(ids, [(0, 1.0)], 4, temperature=float("nan")))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(DecodeRequest([10**6], [(0, 1.0)], 4))
    with pytest.raises(ValueError, match="no expert 7"):
        engine.submit(DecodeRequest(ids, [(7, 1.0)], 4))
    assert not engine.has_work


def test_a_temperature_near_zero_is_greedy_not_nan(tiny_base, bank):
    greedy = _requests(tiny_base)[0]
    tiny = DecodeRequest(greedy.prompt_ids, greedy.members, greedy.max_new_tokens, temperature=1e-30, seed=1)
    engine = DecodeEngine(tiny_base, bank, set())
    generation = engine.submit(tiny)
    engine.run_until_done()
    assert generation.decoded() == _static(tiny_base, bank, greedy) == _static(tiny_base, bank, tiny)


def test_prefill_and_decode_share_the_step_budget(tiny_base, bank):
    requests = _requests(tiny_base)
    cost = len(requests[0].prompt_ids) + bank.num_virtual_tokens  # one row's prefill
    engine = DecodeEngine(tiny_base, bank, set(), max_tokens_per_step=cost + 1)
    generations = [engine.submit(r) for r in requests]
    engine.step()
    assert (
        engine.rows == 1
    )  # an empty batch takes the first request whatever it costs, then the budget is spent
    assert [len(g.tokens) for g in generations] == [1, 0, 0, 0]
    engine.run_until_done()
    assert [g.decoded() for g in generations] == [_static(tiny_base, bank, r) for r in requests]


def test_opinion_requests_are_answered_between_decode_steps(tiny_base, bank):
    options = [["Yes", "No"], ["Agree", "Disagree", "Refuse"]]
    questions = [encode_question(tiny_base.tokenizer, p, o) for p, o in zip(PROMPTS, options)]
    committees = [[(0, 1.0)], [(1, 0.25), (NO_EXPERT, 0.75)]]
    engine = DecodeEngine(tiny_base, bank, set())
    decoding = engine.submit(_requests(tiny_base)[0])
    engine.step()
    futures = [engine.submit_opinion(q, c) for q, c in zip(questions, committees)]
    engine.step()
    expected = committee_distributions(tiny_base, bank, questions, committees)
    for future, want in zip(futures, expected):
        np.testing.assert_allclose(future.result(timeout=0), want, atol=1e-6)
    assert len(decoding.tokens) == 2
    engine.run_until_done()
    assert decoding.decoded() == _static(tiny_base, bank, _requests(tiny_base)[0])


def _expert(base, culture, length, seed):
    prompt = torch.randn(length, base.hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.5
    meta = ExpertMeta(culture, culture[:2].upper(), length, base.hidden_size, base.name, base.fingerprint)
    return Expert(prompt, meta)


def test_experts_of_different_prompt_lengths_decode_as_each_alone(tiny_base):
    experts = [
        _expert(tiny_base, c, n, s) for s, (c, n) in enumerate([("Germany", 2), ("Japan", 7), ("Kenya", 4)])
    ]
    mixed = bank_from_experts(experts)
    ids = token_ids(tiny_base, PROMPTS[0])
    engine = DecodeEngine(tiny_base, mixed, set())
    together = [engine.submit(DecodeRequest(ids, [(e, 1.0)], 8)) for e in range(3)]
    committee = engine.submit(DecodeRequest(ids, [(0, 0.5), (1, 0.3), (NO_EXPERT, 0.2)], 8))
    engine.run_until_done()
    static = committee_generate(tiny_base, mixed, [g.request for g in [*together, committee]], set())
    for e, (expert, generation) in enumerate(zip(experts, together)):
        alone = _static(tiny_base, bank_from_experts([expert]), DecodeRequest(ids, [(0, 1.0)], 8))
        assert generation.decoded() == alone == static[e]
    assert committee.decoded() == static[3]


def test_a_new_bank_between_steps_serves_new_requests_and_running_ones_finish_on_theirs(tiny_base, bank):
    """What a reload of the experts does: running rows carry their prompts in the KV cache; a request is
    prefilled with the bank it was submitted with, whatever the engine's bank is by then."""
    from workers.prompts import SoftPromptBank

    reloaded = SoftPromptBank.initialise(tiny_base, ["Kenya", "Peru"], 6, init="random", seed=9)
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set())
    early = engine.submit(requests[0])
    queued_before_swap = engine.submit(requests[3])
    engine.max_rows = 1  # the second waits
    engine.step()
    engine.step()
    engine.bank = reloaded  # swapped between two steps
    engine.max_rows = 256
    late = engine.submit(DecodeRequest(requests[1].prompt_ids, [(1, 0.6), (0, 0.4)], 5))
    engine.run_until_done()
    assert early.decoded() == _static(tiny_base, bank, requests[0])
    assert queued_before_swap.decoded() == _static(tiny_base, bank, requests[3])  # submitted before the swap
    assert late.decoded() == _static(tiny_base, reloaded, late.request)


def test_held_requests_join_together_and_each_step_is_reported(tiny_base, bank):
    requests = _requests(tiny_base)
    engine = DecodeEngine(tiny_base, bank, set())
    batches = []
    engine.on_batch = batches.append
    question = encode_question(tiny_base.tokenizer, PROMPTS[0], ["Yes", "No"])
    with engine.held():
        generations = [engine.submit(r) for r in requests[:3]]
        opinion = engine.submit_opinion(question, [(2, 1.0)])
        assert not engine.step()  # nothing runs, nothing may be admitted
        assert engine.waiting == 4 and engine.rows == 0
    engine.step()
    assert opinion.done() and engine.running == 3 and engine.rows == 4
    assert [(b.kind, b.requests, b.rows, b.experts) for b in batches] == [
        ("opinion", 1, 1, ("Kenya",)),
        ("decode", 3, 4, ("Germany", "Japan", "Kenya", "base")),
    ]
    engine.run_until_done()
    assert [g.decoded() for g in generations] == [_static(tiny_base, bank, r) for r in requests[:3]]
    assert engine.finished["length"] == 3 and engine.finished["cancelled"] == 0


@pytest.fixture
def running_engine(tiny_base, bank):
    engine = DecodeEngine(tiny_base, bank, set()).start()
    yield engine
    engine.stop()


def test_the_asyncio_api_streams_generates_and_cancels(tiny_base, bank, running_engine):
    requests = _requests(tiny_base)
    question = encode_question(tiny_base.tokenizer, PROMPTS[0], ["Yes", "No"])
    engine_holds, client_left = threading.Event(), threading.Event()
    streamed_request = DecodeRequest(requests[0].prompt_ids, requests[0].members, max_new_tokens=14)

    def hold_third_token(generation, at):
        # The engine waits for the client to leave before picking the third token, so the cancel lands mid-way.
        if generation.request is streamed_request and at == "decode" and len(generation.tokens) == 2:
            engine_holds.set()
            client_left.wait()

    running_engine.fault_hook = hold_third_token

    async def main():
        results = await asyncio.gather(*(engine_streams.generate(running_engine, r) for r in requests))
        opinion = await engine_streams.opinion(running_engine, question, [(0, 0.5), (1, 0.5)])
        streamed = []
        async with engine_streams.stream(running_engine, streamed_request) as tokens:
            async for token in tokens:
                streamed.append(token)
                if len(streamed) == 2:
                    await asyncio.to_thread(engine_holds.wait)
                    break  # the client went away: leaving the block cancels the request
        client_left.set()
        await asyncio.to_thread(tokens.generation.finished.wait)
        return results, opinion, streamed, tokens.generation

    results, opinion, streamed, left = asyncio.run(main())
    assert results == [_static(tiny_base, bank, r) for r in requests]
    expected = committee_distributions(tiny_base, bank, [question], [[(0, 0.5), (1, 0.5)]])[0]
    np.testing.assert_allclose(opinion, expected, atol=1e-6)
    assert streamed == results[0].token_ids[:2]
    assert left.finish_reason == "cancelled" and left.tokens == results[0].token_ids[:3]


def test_a_failing_request_raises_in_its_own_stream_only(tiny_base, bank, running_engine):
    requests = _requests(tiny_base)

    def fault(generation, at):
        if generation.request is requests[1]:
            raise RuntimeError("poisoned")

    running_engine.fault_hook = fault

    async def main():
        return await asyncio.gather(
            *(engine_streams.generate(running_engine, r) for r in requests), return_exceptions=True
        )

    results = asyncio.run(main())
    assert isinstance(results[1], RuntimeError)
    assert [results[i] for i in (0, 2, 3)] == [_static(tiny_base, bank, requests[i]) for i in (0, 2, 3)]


def test_logprobs_come_with_each_token_and_top_p_zero_samples_the_greedy_tokens(tiny_base, bank):
    greedy = _requests(tiny_base)[1]
    asked = DecodeRequest(greedy.prompt_ids, greedy.members, greedy.max_new_tokens, logprobs=3)
    nucleus_of_one = DecodeRequest(greedy.prompt_ids, greedy.members, 3, temperature=1.0, seed=3, top_p=0.0)
    engine = DecodeEngine(tiny_base, bank, set())
    with_logprobs, narrowed = engine.submit(asked), engine.submit(nucleus_of_one)
    engine.run_until_done()
    expected = _static(tiny_base, bank, greedy)
    assert with_logprobs.decoded() == expected == narrowed.decoded()
    assert len(with_logprobs.logprobs) == len(expected.token_ids)
    for token, entry in zip(expected.token_ids, with_logprobs.logprobs):
        assert len(entry.top) == 3 and entry.top[0] == (token, entry.logprob)  # greedy picks the likeliest
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.logprob < 0


def test_a_cancel_ends_a_request_with_its_reason(tiny_base, bank):
    engine = DecodeEngine(tiny_base, bank, set())
    stopped, waiting = engine.submit(_requests(tiny_base)[0]), None
    engine.step()
    engine.step()
    waiting = engine.submit(_requests(tiny_base)[2])
    engine.cancel(stopped, "stop")  # its caller met a stop string in its text
    engine.cancel(waiting, "stop")
    engine.step()
    assert stopped.finish_reason == "stop" and len(stopped.tokens) == 2 and stopped.error is None
    assert waiting.finish_reason == "stop" and waiting.tokens == []
    assert engine.finished["stop"] == 2 and engine.finished["cancelled"] == 0 and engine.rows == 0


def test_stopping_the_engine_fails_what_it_holds_never_a_partial_answer(tiny_base, bank):
    engine = DecodeEngine(tiny_base, bank, set())
    running = engine.submit(_requests(tiny_base)[0])
    engine.step()
    waiting = engine.submit(_requests(tiny_base)[1])
    engine.stop()  # as the replica's shutdown does
    for generation in (running, waiting):
        assert generation.finish_reason == "error" and isinstance(generation.error, EngineStopped)
        with pytest.raises(EngineStopped):
            generation.decoded()


def _reference_greedy(base, prefix, ids, steps):
    """Greedy decoding with no cache carried over: every step recomputes the whole text after the prefix."""
    tokens = []
    for _ in range(steps):
        cache = DynamicCache(config=base.model.config)
        for layer in range(prefix.shape[1]):  # prefix: L_p x layers x 2 x heads x head_dim
            keys, values = (
                prefix[:, layer, 0].transpose(0, 1)[None],
                prefix[:, layer, 1].transpose(0, 1)[None],
            )
            cache.update(keys, values, layer)
        text = torch.tensor([ids + tokens])
        positions = torch.arange(prefix.shape[0], prefix.shape[0] + text.shape[1])[None]
        mask = torch.ones(1, prefix.shape[0] + text.shape[1], dtype=torch.long)
        with torch.no_grad():
            logits = base.model(
                input_ids=text,
                attention_mask=mask,
                position_ids=positions,
                **{cache_kwarg(base.model): cache},
            ).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_engine_greedy_decode_with_a_deep_expert_equals_a_reference_loop(tiny_base):
    deep = random_expert(tiny_base, "Japan", 0, 5, seed=3)
    ids = token_ids(tiny_base, PROMPTS[0])
    engine = DecodeEngine(tiny_base, bank_from_experts([deep]), set())
    generation = engine.submit(DecodeRequest(ids, [(0, 1.0)], max_new_tokens=8))
    engine.run_until_done()
    assert generation.tokens == _reference_greedy(tiny_base, deep.prefix, ids, 8)


@pytest.mark.parametrize("join_at", [0, 3])
def test_engine_rows_of_every_kind_decode_as_each_alone(tiny_base, join_at):
    bank = bank_from_experts(experts_of_every_kind(tiny_base))
    requests = [
        DecodeRequest(token_ids(tiny_base, PROMPTS[0]), [(1, 1.0)], 9),  # deep
        DecodeRequest(token_ids(tiny_base, PROMPTS[1]), [(0, 1.0)], 6),  # input
        DecodeRequest(token_ids(tiny_base, PROMPTS[2]), [(2, 0.6), (3, 0.3), (NO_EXPERT, 0.1)], 7),
        DecodeRequest(token_ids(tiny_base, PROMPTS[1]), [(3, 1.0)], 5),  # a short prefix
    ]
    alone = []
    for request in requests:
        engine = DecodeEngine(tiny_base, bank, set())
        generation = engine.submit(request)
        engine.run_until_done()
        alone.append(generation.decoded())
    assert alone == committee_generate(tiny_base, bank, requests, set())
    engine = DecodeEngine(tiny_base, bank, set())
    first = [engine.submit(r) for r in requests[:2]]
    for _ in range(join_at):
        engine.step()
    later = [engine.submit(r) for r in requests[2:]]
    engine.run_until_done()
    assert [g.decoded() for g in first + later] == alone
