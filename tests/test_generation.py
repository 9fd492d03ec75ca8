"""Joint committee decoding and committee opinions: batched rows give what each request gets alone."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from tests.conftest import PROMPTS, token_ids
from tests.static_decoding import committee_generate
from workers.committees import committee_distributions
from workers.engine import (
    LOGPROB_FLOOR,
    SPARE_SLOTS,
    DecodeRequest,
    choice_seed,
    nucleus,
    pick_tokens,
    token_logprobs,
    with_spare_slots,
)
from workers.prefix import cache_kwarg
from workers.prompts import NO_EXPERT, SoftPromptBank, prompted_inputs
from workers.scoring import encode_question, option_distributions


@pytest.mark.prompt_kinds("input")  # the reference, `generate` from input embeddings, has no deep prefix
def test_committee_of_one_is_plain_greedy_generation_with_that_prompt(tiny_base, bank):
    ids = token_ids(tiny_base, PROMPTS[0])
    [ours] = committee_generate(tiny_base, bank, [DecodeRequest(ids, [(1, 1.0)], max_new_tokens=12)], set())
    inputs = prompted_inputs(
        tiny_base.model,
        torch.tensor([ids]),
        torch.ones(1, len(ids), dtype=torch.long),
        bank,
        torch.tensor([1]),
    )
    reference = tiny_base.model.generate(
        inputs_embeds=inputs["inputs_embeds"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tiny_base.tokenizer.pad_token_id,
    )
    assert ours.token_ids == reference[0, -12:].tolist()
    assert ours.finish_reason == "length"


def _reference_mixture(base, bank, ids, members, steps):
    """Greedy committee decoding the slow way: every step re-runs each member's full sequence, no cache."""
    tokens = []
    for _ in range(steps):
        seq = torch.tensor([ids + tokens] * len(members))
        inputs = prompted_inputs(
            base.model, seq, torch.ones_like(seq), bank, torch.tensor([e for e, _ in members])
        )
        with torch.no_grad():
            probs = torch.softmax(base.model(**inputs).logits[:, -1].float(), -1)
        mixed = sum(w * probs[i] for i, (_, w) in enumerate(members))
        tokens.append(int(mixed.argmax()))
    return tokens


def test_joint_decoding_mixes_member_distributions_every_step(tiny_base, bank):
    ids = token_ids(tiny_base, PROMPTS[2])
    members = [(0, 0.6), (2, 0.3), (NO_EXPERT, 0.1)]
    [ours] = committee_generate(tiny_base, bank, [DecodeRequest(ids, members, max_new_tokens=6)], set())
    assert ours.token_ids == _reference_mixture(tiny_base, bank, ids, members, 6)


def test_each_request_of_a_mixed_batch_decodes_as_it_would_alone(tiny_base, bank):
    requests = [
        DecodeRequest(token_ids(tiny_base, PROMPTS[0]), [(0, 1.0)], max_new_tokens=7),
        DecodeRequest(token_ids(tiny_base, PROMPTS[1]), [(1, 0.5), (2, 0.5)], max_new_tokens=3),
        DecodeRequest(token_ids(tiny_base, PROMPTS[2]), [(NO_EXPERT, 1.0)], max_new_tokens=5),
        DecodeRequest(
            token_ids(tiny_base, PROMPTS[1]), [(2, 1.0)], max_new_tokens=6, temperature=0.8, seed=11
        ),
    ]
    together = committee_generate(tiny_base, bank, requests, set())
    for request, got in zip(requests, together):
        [alone] = committee_generate(tiny_base, bank, [request], set())
        assert got == alone
        assert len(got.token_ids) == request.max_new_tokens


def test_sampling_is_reproducible_with_a_seed(tiny_base, bank):
    ids = token_ids(tiny_base, PROMPTS[0])

    def sample(seed):
        request = DecodeRequest(ids, [(0, 0.5), (1, 0.5)], max_new_tokens=10, temperature=1.5, seed=seed)
        return committee_generate(tiny_base, bank, [request], set())[0].token_ids

    assert sample(3) == sample(3)
    assert len({tuple(sample(s)) for s in range(4)}) > 1


def test_a_stop_token_ends_a_request_without_being_returned(tiny_base, bank):
    ids = token_ids(tiny_base, PROMPTS[0])
    [free] = committee_generate(tiny_base, bank, [DecodeRequest(ids, [(0, 1.0)], max_new_tokens=5)], set())
    stop = free.token_ids[2]
    [stopped] = committee_generate(
        tiny_base, bank, [DecodeRequest(ids, [(0, 1.0)], max_new_tokens=5)], {stop}
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop)]


def test_bad_requests_are_refused(tiny_base, bank):
    with pytest.raises(ValueError, match="at least one member with a positive weight"):
        committee_generate(tiny_base, bank, [DecodeRequest([1, 2], [], max_new_tokens=2)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        committee_generate(tiny_base, bank, [DecodeRequest([1, 2], [(0, 1.0)], max_new_tokens=0)])


@pytest.mark.parametrize("per_expert", [False, True])
def test_committee_opinion_is_the_weighted_mixture_of_member_distributions(tiny_base, bank, per_expert):
    options = [["Yes", "No"], ["Agree", "Disagree", "Refuse"], ["A lot", "Some", "Not much", "None"]]
    questions = [encode_question(tiny_base.tokenizer, p, o) for p, o in zip(PROMPTS, options)]
    committees = [[(0, 1.0)], [(1, 0.25), (2, 0.75)], [(NO_EXPERT, 0.5), (0, 0.5)]]
    got = committee_distributions(tiny_base, bank, questions, committees, per_expert=per_expert)
    for question, members, mixed in zip(questions, committees, got):
        alone = [option_distributions(tiny_base, bank, [question], [e])[0] for e, _ in members]
        expected = sum(w * d for (_, w), d in zip(members, alone))
        np.testing.assert_allclose(mixed, expected, atol=1e-5)
        assert mixed.shape == (question.n_options,) and abs(mixed.sum() - 1) < 1e-9


def test_static_decoding_with_mixed_prompt_lengths_equals_each_expert_alone(tiny_base):
    prompts = [
        torch.randn(n, tiny_base.hidden_size, generator=torch.Generator().manual_seed(n)) for n in (2, 6)
    ]
    bank = SoftPromptBank(["Germany", "Japan"], prompts)
    ids = token_ids(tiny_base, PROMPTS[0])
    together = committee_generate(tiny_base, bank, [DecodeRequest(ids, [(e, 1.0)], 8) for e in (0, 1)], set())
    for prompt, got in zip(prompts, together):
        alone = SoftPromptBank(["alone"], [prompt])
        assert got == committee_generate(tiny_base, alone, [DecodeRequest(ids, [(0, 1.0)], 8)], set())[0]


def test_a_temperature_near_zero_decodes_greedily_and_bad_seeds_are_refused(tiny_base, bank):
    ids = token_ids(tiny_base, PROMPTS[1])
    greedy = committee_generate(tiny_base, bank, [DecodeRequest(ids, [(0, 1.0)], 6)], set())
    tiny = committee_generate(tiny_base, bank, [DecodeRequest(ids, [(0, 1.0)], 6, temperature=1e-30)], set())
    assert tiny == greedy
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match="seed must be in"):
            committee_generate(
                tiny_base, bank, [DecodeRequest(ids, [(0, 1.0)], 6, temperature=1.0, seed=seed)]
            )


def test_a_decode_cache_with_spare_slots_gives_dynamic_caches_numbers(tiny_base):
    # Past its spare slots, and after a reorder from outside (what the engine does when rows leave).
    model, kwarg = tiny_base.model, cache_kwarg(tiny_base.model)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    runs = []
    for cache in (DynamicCache(config=model.config), with_spare_slots(DynamicCache(config=model.config))):
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{kwarg: cache},
        )
        logits = [out.logits[:, -1]]
        for step in range(SPARE_SLOTS + 8):
            next_ids, positions = logits[-1].argmax(-1, keepdim=True), mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            if step == 5:
                keep = torch.tensor([0, 2])
                cache.reorder_cache(keep)
                next_ids, positions, mask = next_ids[keep], positions[keep], mask[keep]
            out = model(
                input_ids=next_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{kwarg: cache},
            )
            logits.append(out.logits[:, -1])
        runs.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------------------
# Sampling: top_p's nucleus, log probabilities, the seeds of several choices
# ---------------------------------------------------------------------------------------------------------


def test_the_nucleus_keeps_the_fewest_most_likely_tokens_that_reach_top_p():
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # exact in binary: comparisons are exact
    assert nucleus(probs, 1.0) is probs
    assert nucleus(probs, 0.5).tolist() == [0, 0.5, 0, 0]  # 0.5 alone reaches 0.5
    assert nucleus(probs, 0.6).tolist() == [0, 0.5, 0, 0.25]
    assert nucleus(probs, 0.8).tolist() == [0.125, 0.5, 0, 0.25]  # 0.75 is not yet 0.8; a tie: the lower id
    assert nucleus(probs, 0.0).tolist() == [0, 0.5, 0, 0]  # the most likely always stays


def test_sampling_draws_only_from_the_nucleus_and_top_p_zero_is_greedy():
    torch.manual_seed(0)
    mixed = torch.softmax(torch.randn(3, 50) * 3, dim=-1)
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    greedy = pick_tokens(mixed, [None] * 3)
    assert pick_tokens(mixed, generators, [0.0] * 3) == greedy
    for seed in range(20):
        generators = [torch.Generator().manual_seed(seed) for _ in range(3)]
        tokens = pick_tokens(mixed, generators, [0.5, 0.9, 1.0])
        for row, (token, top_p) in enumerate(zip(tokens[:2], [0.5, 0.9])):
            assert nucleus(mixed[row], top_p)[token] > 0


def test_token_logprobs_are_the_mixed_distributions_logs():
    mixed = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.3, 0.0]])
    first, none, third = token_logprobs(mixed, [1, 0, 3], [2, None, 0])
    assert none is None
    assert first.logprob == pytest.approx(np.log(0.2)) and [t for t, _ in first.top] == [0, 1]
    assert [lp for _, lp in first.top] == pytest.approx([np.log(0.7), np.log(0.2)])
    assert third.top == [] and third.logprob == LOGPROB_FLOOR  # probability 0: a finite floor, not -inf


def test_each_choice_gets_its_own_seed_the_first_the_requests():
    seeds = [choice_seed(7, i) for i in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [choice_seed(7, i) for i in range(4)]  # derived, not random
    assert choice_seed(None, 3) is None
