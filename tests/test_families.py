"""Every model family users bring, PEFT-style: each tiny random layout trains, scores, serves and exports.

Sliding-window families (Mistral, Phi-3, Qwen2 with a window, Gemma 2 and 3, OLMo 3) have a window shorter
than the prompts here, so their windows really slide; Gemma's embedding module scales its rows.
"""

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import PROMPTS, experts_of_every_kind, random_expert, token_ids
from workers.attention import layer_kinds, windowed
from workers.base_model import load_frozen_base
from workers.engine import DecodeEngine, DecodeRequest
from workers.expert_file import Expert
from workers.peft_export import export_peft_adapter
from workers.prompts import NO_EXPERT, SoftPromptBank, bank_from_experts, persona_text, prompted_inputs
from workers.scoring import encode_question, option_distributions
from workers.tiny_model import FAMILIES, TINY_WINDOW, save_tiny_model
from workers.trainer import PackedTrainer, TrainConfig

LONG = " ".join(PROMPTS * 3)  # a neighbour several windows long


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def base(family_dir):
    return load_frozen_base(str(family_dir), device="cpu")


def _logits(base, bank, ids, expert):
    """The last position's logits of one row under `bank`'s expert `expert` (the forward scoring makes)."""
    ids = torch.tensor([ids])
    inputs = prompted_inputs(base.model, ids, torch.ones_like(ids), bank, torch.tensor([expert]))
    with torch.no_grad():
        return base.model(**windowed(base.model, inputs)).logits[0, -1]


def _text_logits(base, ids):
    with torch.no_grad():
        return base.model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_persona_init_answers_as_the_persona_text_for_input_and_deep_prompts(base):
    persona = token_ids(base, persona_text("Kenya"))
    assert len(persona) > TINY_WINDOW  # a persona longer than a window
    question = token_ids(base, PROMPTS[0])
    text = _text_logits(base, persona + question)
    for kind in ("input", "deep"):
        bank = SoftPromptBank.initialise(base, ["Kenya"], len(persona), kind=kind)
        torch.testing.assert_close(_logits(base, bank, question, 0), text, atol=1e-4, rtol=1e-4)
    # Random input prompts start on the scale of the embedding module's output (Gemma scales its rows).
    noise = SoftPromptBank.initialise(base, ["Kenya"], 64, init="random", seed=1)
    embedded = base.model.get_input_embeddings()(torch.tensor(persona))
    assert 0.5 < float(noise.prompts[0].detach().std() / embedded.std()) < 2


def test_scoring_a_row_alone_equals_it_beside_a_long_neighbour(base):
    experts = experts_of_every_kind(base)
    bank = bank_from_experts(experts)
    short = encode_question(base.tokenizer, PROMPTS[1], ["Yes", "No", "Maybe"])
    long = encode_question(base.tokenizer, LONG, ["Yes", "No"])
    for expert in (0, 1, 2, NO_EXPERT):
        alone_bank = bank_from_experts([experts[expert]]) if expert != NO_EXPERT else None
        [alone] = option_distributions(base, alone_bank, [short], [0 if alone_bank else NO_EXPERT])
        together = option_distributions(base, bank, [short, long], [expert, 3])
        np.testing.assert_allclose(together[0], alone, atol=1e-6)


def test_engine_mixed_batch_equals_each_request_alone_and_sliding_layers_keep_their_window(base):
    bank = bank_from_experts(experts_of_every_kind(base))
    requests = [
        DecodeRequest(token_ids(base, PROMPTS[0]), [(NO_EXPERT, 1.0)], 60),
        DecodeRequest(token_ids(base, PROMPTS[1]), [(0, 1.0)], 6),
        DecodeRequest(token_ids(base, PROMPTS[2]), [(1, 1.0)], 50),
        DecodeRequest(token_ids(base, PROMPTS[1]), [(2, 0.6), (3, 0.3), (NO_EXPERT, 0.1)], 7),
        DecodeRequest(token_ids(base, LONG), [(1, 0.5), (2, 0.5)], 5),
    ]
    alone = []
    for request in requests:
        engine = DecodeEngine(base, bank, set())
        generation = engine.submit(request)
        engine.run_until_done()
        alone.append(generation.tokens)
    engine = DecodeEngine(base, bank, set())
    generations = [engine.submit(r) for r in requests[:2]]
    engine.step()
    engine.step()
    generations += [engine.submit(r) for r in requests[2:]]
    held = []
    while engine.has_work:
        engine.step()
        if engine.kv.cache is not None:
            held.append((min(engine.kv.widths), engine.kv.mask.shape[1]))
    assert [g.tokens for g in generations] == alone
    if layer_kinds(base.model.config).window is not None:
        # Sliding layers forget what every row's window has passed: fewer slots than the running width.
        slots, width = held[-1]
        assert slots < width and slots <= TINY_WINDOW + 32 + len(token_ids(base, PROMPTS[2]))


def test_a_training_step_moves_input_and_deep_prompts(base):
    questions = [
        encode_question(base.tokenizer, q, ["Yes", "No", "Maybe"], np.array([0.7, 0.2, 0.1]))
        for q in (PROMPTS[1], LONG)  # the first within reach of a prompt through three windows
    ]
    config = TrainConfig(epochs=1, batch_size=2, lr=0.05, patience=1)
    for tokens, prefix_tokens in ((4, 0), (0, 3)):
        expert = random_expert(base, "Kenya", tokens, prefix_tokens, seed=4)
        bank = bank_from_experts([expert])
        trained = [p for p in bank.parameters() if p.numel()]
        start = [p.detach().clone() for p in trained]
        PackedTrainer(base, bank, {"Kenya": questions}, {"Kenya": questions[:1]}, config).train_epoch()
        assert all(not torch.allclose(p, s) and torch.isfinite(p).all() for p, s in zip(trained, start))


def test_peft_export_gives_the_same_logits(base, family_dir, tmp_path):
    ids = token_ids(base, PROMPTS[0])
    for expert in (
        Expert(torch.randn(5, base.hidden_size) * 0.5, random_expert(base, "Japan", 5, 0, seed=1).meta),
        random_expert(base, "Japan", 0, 5, seed=3),
    ):
        adapter = export_peft_adapter(expert, base.model, tmp_path / str(expert.prefix is None))
        ours = _logits(base, bank_from_experts([expert]), ids, 0)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family_dir), adapter)
        with torch.no_grad():
            row = torch.tensor([ids])
            theirs = peft_model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0, -1]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
