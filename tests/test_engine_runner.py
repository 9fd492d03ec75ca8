"""The engine's model runner alone: prefill and decode give the model's own numbers, and picks are reproducible."""

import pytest
import torch

from tests.conftest import PROMPTS, token_ids
from workers.engine import DecodeRequest, Generation, sampler
from workers.engine.model_runner import ModelRunner
from workers.prompts import NO_EXPERT, prompted_inputs


def _generation(request: DecodeRequest, bank=None) -> Generation:
    g = Generation(0, request, bank=bank, weights=[w for _, w in request.members])
    g.generator = sampler(request)
    return g


def _greedy_by_hand(base, bank, ids, expert, steps):
    """Greedy decoding the slow way: every step one forward over the whole text, no cache. Its logits too."""
    tokens, logits = [], []
    for _ in range(steps):
        text = torch.tensor([ids + tokens])
        inputs = prompted_inputs(base.model, text, torch.ones_like(text), bank, torch.tensor([expert]))
        with torch.no_grad():
            logits.append(base.model(**inputs).logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


@pytest.mark.prompt_kinds("input")  # the reference feeds input prompts; the engine tests cover deep prefixes
@pytest.mark.parametrize("expert", [NO_EXPERT, 1])
def test_prefill_then_decode_of_one_row_is_the_models_own_greedy_continuation(tiny_base, bank, expert):
    ids = token_ids(tiny_base, PROMPTS[0])
    g = _generation(DecodeRequest(ids, [(expert, 1.0)], 6), bank)
    runner = ModelRunner(tiny_base)
    expected_tokens, expected_logits = _greedy_by_hand(tiny_base, bank, ids, expert, 6)
    with torch.no_grad():
        logits, cache, mask = runner.prefill([g])
        width = (0 if expert == NO_EXPERT else bank.num_virtual_tokens) + len(ids)
        assert mask.shape == (1, width)  # the plain base model takes no prompt slots
        tokens = []
        for step in range(6):
            torch.testing.assert_close(logits[0], expected_logits[step], atol=1e-4, rtol=1e-4)
            g.next_token = int(logits[0].argmax())
            tokens.append(g.next_token)
            logits, mask = runner.decode([g], cache, mask)
            assert mask.shape == (1, width + step + 1)
    assert tokens == expected_tokens


def test_a_pick_mixes_members_by_weight_and_a_seed_draws_the_same_tokens(tiny_base):
    runner = ModelRunner(tiny_base)
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    members = [(0, 0.25), (1, 0.75)]

    def picks(seed, draws=6):
        running = [
            _generation(DecodeRequest([1], members, 4, temperature=1.3, seed=seed, logprobs=2)),
            _generation(DecodeRequest([1], [(0, 1.0)], 4)),  # greedy
            _generation(DecodeRequest([1], members, 4, temperature=0.7, seed=seed + 1, top_p=0.5)),
        ]
        mixed = runner.mix(logits, running)
        out = [runner.pick(mixed, running) for _ in range(draws)]  # each draw moves the generators on
        return mixed, out

    mixed, first = picks(3)
    plain = torch.softmax(logits, -1)
    torch.testing.assert_close(mixed[1], plain[2])  # the greedy request: its member's plain distribution
    torch.testing.assert_close(
        mixed[0], 0.25 * torch.softmax(logits[0] / 1.3, -1) + 0.75 * torch.softmax(logits[1] / 1.3, -1)
    )
    assert all(finite == [True] * 3 for finite, _, _ in first)
    assert {tokens[1] for _, tokens, _ in first} == {int(plain[2].argmax())}
    assert first == picks(3)[1]  # the same seeds: the same draws
    assert [t for _, t, _ in first] != [t for _, t, _ in picks(4)[1]]
    _, tokens, logprobs = first[0]
    assert len(logprobs[0].top) == 2 and logprobs[1] is None and logprobs[2] is None
    assert logprobs[0].logprob == pytest.approx(float(mixed[0, tokens[0]].log()), abs=1e-5)
