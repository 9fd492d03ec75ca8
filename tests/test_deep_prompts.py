"""Deep prompts (per-layer prefixes) and composed experts (a prefix + input tokens): batching, training,
persistence, PEFT export and the continuous-batching engine, each against the expert alone or a reference."""

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache

from tests.conftest import PROMPTS, token_ids
from tests.test_trainer import _data
from workers.engine import DecodeEngine
from workers.expert_file import Expert, ExpertMeta, PromptMismatchError, load_expert, save_expert
from workers.generation import DecodeRequest, committee_generate
from workers.peft_export import PeftExportError, export_peft_adapter
from workers.prefix import cache_kwarg, kv_shape
from workers.prompts import NO_EXPERT, SoftPromptBank, bank_from_experts, persona_text, prompted_inputs
from workers.scoring import encode_question, left_pad, option_distributions
from workers.trainer import PackedTrainer, TrainConfig

# (input tokens, prefix tokens) of experts of every kind, and of several lengths.
SHAPES = {"Germany": (2, 0), "Japan": (0, 5), "Kenya": (4, 3), "Brazil": (0, 1)}


def _meta(base, culture):
    return ExpertMeta(culture, culture[:2].upper(), 0, base.hidden_size, base.name, base.fingerprint)


def _expert(base, culture, tokens, prefix_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(tokens, base.hidden_size, generator=generator) * 0.5
    layers, kv_heads, head_dim = kv_shape(base.model.config)
    prefix = torch.randn(prefix_tokens, layers, 2, kv_heads, head_dim, generator=generator)
    return Expert(prompt, _meta(base, culture), prefix if prefix_tokens else None)


def _experts(base):
    return [_expert(base, c, n, p, seed) for seed, (c, (n, p)) in enumerate(SHAPES.items())]


def _last_logits(base, bank, texts, expert_idx):
    ids, mask = left_pad([token_ids(base, t) for t in texts], base.tokenizer.pad_token_id)
    inputs = prompted_inputs(base.model, ids, mask, bank, torch.tensor(expert_idx) if bank else None)
    with torch.no_grad():
        return base.model(**inputs).logits[:, -1]


def test_rows_of_every_kind_in_one_batch_match_each_row_alone(tiny_base):
    experts = _experts(tiny_base)
    bank = bank_from_experts(experts)
    assert bank.lengths == [2, 0, 4, 0] and bank.prefix_lengths == [0, 5, 3, 1]
    assert bank.num_virtual_tokens == 5 + 4  # the slots (positions) a row may take
    rows = [1, 0, NO_EXPERT, 2, 3, 1]
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    mixed = _last_logits(tiny_base, bank, texts, rows)
    for row, (text, expert) in enumerate(zip(texts, rows)):
        alone_bank = bank_from_experts([experts[expert]]) if expert != NO_EXPERT else None
        alone = _last_logits(tiny_base, alone_bank, [text], [0] if alone_bank else [])[0]
        torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=1e-4)
    # The prefix matters: the same text under two deep experts answers differently.
    assert not torch.allclose(mixed[0], mixed[4])

    # Scoring (validation, evaluation) takes the same path.
    questions = [encode_question(tiny_base.tokenizer, t, ["Yes", "No", "Maybe"]) for t in PROMPTS[:2]]
    pairs = [(q, e) for q in questions for e in (0, 1, 2, NO_EXPERT)]
    together = option_distributions(tiny_base, bank, [q for q, _ in pairs], [e for _, e in pairs])
    for (question, expert), got in zip(pairs, together):
        alone_bank = bank_from_experts([experts[expert]]) if expert != NO_EXPERT else None
        [alone] = option_distributions(tiny_base, alone_bank, [question], [0 if alone_bank else NO_EXPERT])
        np.testing.assert_allclose(got, alone, atol=1e-6)


def test_a_rows_first_token_sits_after_its_real_prefix_and_prompt(tiny_base):
    bank = bank_from_experts(_experts(tiny_base))
    ids, mask = left_pad([token_ids(tiny_base, "Answer: A"), token_ids(tiny_base, PROMPTS[0])], 0)
    inputs = prompted_inputs(tiny_base.model, ids, mask, bank, torch.tensor([2, 3]))
    first = mask.argmax(-1) + bank.input_tokens  # each row's first real token, among the input columns
    assert inputs["position_ids"][torch.arange(2), first].tolist() == [3 + 4, 1 + 0]
    assert inputs["attention_mask"].shape[1] == 3 + bank.input_tokens + ids.shape[1]


def test_persona_init_answers_as_the_persona_text(tiny_base):
    ids = tiny_base.tokenizer(persona_text("Kenya"), add_special_tokens=False)["input_ids"]
    bank = SoftPromptBank.initialise(tiny_base, ["Kenya"], len(ids), kind="deep")
    assert bank.lengths == [0] and bank.prefix_lengths == [len(ids)]
    ours = _last_logits(tiny_base, bank, [PROMPTS[0]], [0])
    with torch.no_grad():
        text = tiny_base.model(input_ids=torch.tensor([ids + token_ids(tiny_base, PROMPTS[0])])).logits[:, -1]
    torch.testing.assert_close(ours, text, atol=1e-5, rtol=1e-4)
    # Longer than the text: its tokens repeat, as the input init repeats them.
    longer = SoftPromptBank.initialise(tiny_base, ["Kenya"], len(ids) + 3, kind="deep")
    torch.testing.assert_close(longer.prefixes[0][len(ids) :], bank.prefixes[0][:3])
    noise = SoftPromptBank.initialise(tiny_base, ["Kenya", "Japan"], 4, init="random", kind="deep", seed=2)
    assert noise.prefixes[0].shape == (4, *bank.prefixes[0].shape[1:])
    assert not torch.allclose(noise.prefixes[0], noise.prefixes[1])


def test_gradients_reach_the_used_prefixes_only(tiny_base):
    bank = bank_from_experts(_experts(tiny_base))
    ids, mask = left_pad([token_ids(tiny_base, PROMPTS[0])] * 2, tiny_base.tokenizer.pad_token_id)
    inputs = prompted_inputs(tiny_base.model, ids, mask, bank, torch.tensor([2, 1]))
    tiny_base.model(**inputs, use_cache=False).logits.sum().backward()
    assert bank.prefix(1).grad is not None and bank.prefix(2).grad is not None
    assert bool(bank.prefix(1).grad.abs().sum() > 0) and bool(bank.prompts[2].grad.abs().sum() > 0)
    assert bank.prefix(3).grad is None and bank.prompts[0].grad is None  # AdamW leaves them alone

    # A shared prefix learns from every row that uses it; frozen, it learns from none.
    shared = _expert(tiny_base, "all", 0, 3, seed=9).prefix
    prompts = [e.prompt for e in _experts(tiny_base)[:2]]
    tied = SoftPromptBank(["Germany", "Japan"], prompts, shared_prefix=shared)
    assert tied.prefix(0) is tied.prefix(1) is tied.shared_prefix
    assert tied.units() == [["Germany", "Japan"]]
    inputs = prompted_inputs(tiny_base.model, ids[:1], mask[:1], tied, torch.tensor([1]))
    tiny_base.model(**inputs, use_cache=False).logits.sum().backward()
    assert tied.shared_prefix.grad is not None
    tied.shared_prefix.requires_grad_(False)
    assert tied.units() == [["Germany"], ["Japan"]]  # on a frozen prefix each expert trains alone


def test_copy_expert_copies_both_parts_and_keeps_a_shared_prefix_shared(tiny_base):
    bank = bank_from_experts(_experts(tiny_base))
    grown = bank.copy_expert("Kenya", "Tanzania")
    torch.testing.assert_close(grown.prompts[4], bank.prompts[2])
    torch.testing.assert_close(grown.prefix(4), bank.prefix(2))
    assert grown.prefix(4) is not grown.prefix(2)  # a copy, trained on its own
    tied = SoftPromptBank(["Germany"], [torch.zeros(2, tiny_base.hidden_size)], shared_prefix=bank.prefix(1))
    tied.shared_prefix.requires_grad_(False)
    grown = tied.copy_expert("Germany", "Austria")
    assert grown.prefix(1) is grown.shared_prefix and not grown.shared_prefix.requires_grad


@pytest.fixture
def llama_base(llama_dir):
    """The GQA layout (fewer key/value heads than heads) for the training tests; the others take both layouts."""
    from workers.base_model import load_frozen_base

    return load_frozen_base(str(llama_dir), device="cpu")


def _config(**changes):
    return TrainConfig(
        epochs=2, batch_size=2, grad_accum=2, lr=0.05, weight_decay=0.01, patience=10, seed=7
    ).model_copy(update=changes)


@pytest.mark.parametrize("kind", ["deep", "composed", "on a frozen shared prefix"])
def test_packed_training_equals_training_each_expert_alone(llama_base, kind):
    sizes = {"Germany": 5, "Japan": 3, "Kenya": 4}
    train, val = _data(llama_base.tokenizer, sizes)
    shapes = {"deep": [(0, 2), (0, 5), (0, 3)], "composed": [(3, 2), (1, 4), (2, 1)]}
    shapes["on a frozen shared prefix"] = [(3, 0), (1, 0), (2, 0)]
    experts = [_expert(llama_base, c, n, p, s) for s, (c, (n, p)) in enumerate(zip(sizes, shapes[kind]))]
    shared = _expert(llama_base, "all", 0, 3, seed=11).prefix if kind.endswith("prefix") else None

    def bank(chosen):
        made = SoftPromptBank(
            [e.meta.culture for e in chosen], [e.prompt for e in chosen], [e.prefix for e in chosen], shared
        )
        if shared is not None:
            made.shared_prefix.requires_grad_(False)
        return made

    packed = bank(experts)
    packed_result = PackedTrainer(llama_base, packed, train, val, _config()).fit()
    for i, expert in enumerate(experts):
        culture = expert.meta.culture
        alone = bank([expert])
        alone_result = PackedTrainer(
            llama_base, alone, {culture: train[culture]}, {culture: val[culture]}, _config()
        ).fit()
        torch.testing.assert_close(packed.prompts[i], alone.prompts[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(packed.prefix(i), alone.prefix(0), atol=2e-5, rtol=1e-4)
        assert packed_result.best_val_alignment[culture] == pytest.approx(
            alone_result.best_val_alignment[culture]
        )
    moved = [
        not torch.allclose(packed.prompts[i], e.prompt) for i, e in enumerate(experts) if e.prompt.numel()
    ]
    moved += [
        not torch.allclose(packed.prefix(i), e.prefix) for i, e in enumerate(experts) if e.prefix is not None
    ]
    assert all(moved)  # it did train
    if shared is not None:
        torch.testing.assert_close(packed.shared_prefix, shared)  # frozen: untouched


def test_a_tied_prefix_trains_on_every_row_and_its_experts_stop_together(llama_base):
    train, val = _data(llama_base.tokenizer, {"Germany": 4, "Japan": 4})
    shared = _expert(llama_base, "all", 0, 3, seed=4).prefix
    empty = torch.zeros(0, llama_base.hidden_size)
    bank = SoftPromptBank(["Germany", "Japan"], [empty, empty], shared_prefix=shared)
    trainer = PackedTrainer(llama_base, bank, train, val, _config(epochs=3, patience=1, lr=0.3))
    result = trainer.fit()
    assert not torch.allclose(bank.shared_prefix, shared)
    assert result.best_epoch["Germany"] == result.best_epoch["Japan"]
    best = trainer.best_bank()
    assert best.prefix(0) is best.prefix(1)
    torch.testing.assert_close(best.shared_prefix, bank.shared_prefix)


def test_prefix_layers_trains_only_the_top_layers_and_backpropagates_no_lower(llama_base):
    train, val = _data(llama_base.tokenizer, {"Germany": 4, "Japan": 3})
    start = SoftPromptBank.initialise(llama_base, ["Germany", "Japan"], 3, init="random", kind="deep")
    layers = start.prefixes[0].shape[1]
    assert layers >= 2
    bank = SoftPromptBank(start.cultures, list(start.prompts), [p.detach() for p in start.prefixes])
    PackedTrainer(llama_base, bank, train, val, _config(weight_decay=0.0, prefix_layers=1)).fit()
    for i in range(2):
        torch.testing.assert_close(bank.prefix(i)[:, :-1], start.prefix(i)[:, :-1], rtol=0, atol=0)
        assert not torch.allclose(bank.prefix(i)[:, -1], start.prefix(i)[:, -1])  # the top layer learned

    # Same outputs as the whole prefix; backward reaches the top layer only, so it leaves the lower ones
    # a zero gradient and builds no graph below (the saving).
    ids, mask = left_pad([token_ids(llama_base, PROMPTS[0])], llama_base.tokenizer.pad_token_id)
    bank.trained_layers = None
    whole = prompted_inputs(llama_base.model, ids, mask, bank, torch.tensor([0]))
    bank.trained_layers = 1
    top = prompted_inputs(llama_base.model, ids, mask, bank, torch.tensor([0]))
    out = llama_base.model(**top, use_cache=False, output_hidden_states=True)
    logits = out.logits
    torch.testing.assert_close(logits, llama_base.model(**whole, use_cache=False).logits)
    # hidden_states[i] is what layer i-1 outputs: no graph until the top layer, which attends to the prefix.
    assert [h.requires_grad for h in out.hidden_states] == [False] * layers + [True]
    logits.sum().backward()
    grad = bank.prefix(0).grad
    assert bool(grad[:, :-1].eq(0).all()) and bool(grad[:, -1].abs().sum() > 0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(prefix_layers=2, weight_decay=0.01)


def test_a_checkpoint_restores_the_prefixes(llama_base, tmp_path):
    train, val = _data(llama_base.tokenizer, {"Germany": 4})
    trained = SoftPromptBank.initialise(llama_base, ["Germany"], 3, init="random", kind="deep")
    trainer = PackedTrainer(llama_base, trained, train, val, _config(epochs=1))
    trainer.fit()
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    fresh = SoftPromptBank.initialise(llama_base, ["Germany"], 3, init="random", kind="deep", seed=1)
    resumed = PackedTrainer(llama_base, fresh, train, val, _config(epochs=1))
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    torch.testing.assert_close(fresh.prefix(0), trained.prefix(0))
    torch.testing.assert_close(resumed.best_prefixes["Germany"], trainer.best_prefixes["Germany"])


def test_zero_training_refuses_deep_experts(llama_base):
    from workers.zero import ZeroTrainer

    bank = SoftPromptBank.initialise(llama_base, ["Germany"], 2, kind="deep")
    with pytest.raises(ValueError, match="input prompts only"):
        ZeroTrainer(llama_base, bank, {}, {}, _config(), ds={})


def test_save_load_roundtrip_of_every_kind(tiny_base, tmp_path):
    for expert in _experts(tiny_base):
        path = save_expert(tmp_path / f"{expert.meta.culture}.safetensors", expert)
        loaded = load_expert(path, tiny_base)
        torch.testing.assert_close(loaded.prompt, expert.prompt)
        if expert.prefix is None:
            assert loaded.prefix is None and loaded.meta.kind == "input"
        else:
            torch.testing.assert_close(loaded.prefix, expert.prefix)
        n, p = SHAPES[expert.meta.culture]
        assert (loaded.meta.num_virtual_tokens, loaded.meta.prefix_tokens) == (n, p)
        assert loaded.meta.kind == {(True, False): "input", (False, True): "deep"}.get(
            (n > 0, p > 0), "composed"
        )
    bank = bank_from_experts([load_expert(tmp_path / f"{c}.safetensors") for c in SHAPES])
    assert bank.lengths == [2, 0, 4, 0] and bank.prefix_lengths == [0, 5, 3, 1]


def test_a_file_from_before_deep_prompts_loads_as_input_only(tiny_base, tmp_path):
    header = {
        "culture": "Germany",
        "iso": "DE",
        "num_virtual_tokens": "4",
        "hidden_size": str(tiny_base.hidden_size),
        "base_model": tiny_base.name,
        "base_fingerprint": tiny_base.fingerprint,
        "training": "{}",
        "descriptor": "",
        "format_version": "1",
    }
    save_file({"prompt": torch.ones(4, tiny_base.hidden_size)}, tmp_path / "old.safetensors", header)
    old = load_expert(tmp_path / "old.safetensors", tiny_base)
    assert old.prefix is None and old.meta.kind == "input" and old.meta.prefix_tokens == 0


@pytest.mark.parametrize("axis, name", [(1, "num_layers"), (3, "num_key_value_heads"), (4, "head_dim")])
def test_a_prefix_for_another_cache_shape_is_refused(tiny_base, tmp_path, axis, name):
    expert = _expert(tiny_base, "Japan", 0, 3, seed=1)
    shape = list(expert.prefix.shape)
    shape[axis] += 1
    expert.prefix = torch.zeros(shape)
    path = save_expert(tmp_path / "japan.safetensors", expert)
    with pytest.raises(PromptMismatchError, match=f"{name}={shape[axis]}, model has {shape[axis] - 1}"):
        load_expert(path, tiny_base)


def test_peft_prefix_tuning_export_gives_the_same_logits(tiny_model_dirs, tmp_path):
    from workers.base_model import load_frozen_base

    for family, folder in tiny_model_dirs.items():
        base = load_frozen_base(str(folder), device="cpu")
        deep = _expert(base, "Japan", 0, 5, seed=3)
        adapter = export_peft_adapter(deep, base.model, tmp_path / family)
        ids = torch.tensor([token_ids(base, PROMPTS[0])])
        with torch.no_grad():
            ours = base.model(
                **prompted_inputs(
                    base.model, ids, torch.ones_like(ids), bank_from_experts([deep]), torch.tensor([0])
                )
            ).logits[:, -1]
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter)
            theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        with pytest.raises(PeftExportError, match="a deep prefix and 4 input tokens"):
            export_peft_adapter(_expert(base, "Kenya", 4, 3, seed=1), base.model, tmp_path / "composed")


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
    deep = _expert(tiny_base, "Japan", 0, 5, seed=3)
    ids = token_ids(tiny_base, PROMPTS[0])
    engine = DecodeEngine(tiny_base, bank_from_experts([deep]), set())
    generation = engine.submit(DecodeRequest(ids, [(0, 1.0)], max_new_tokens=8))
    engine.run_until_done()
    assert generation.tokens == _reference_greedy(tiny_base, deep.prefix, ids, 8)


@pytest.mark.parametrize("join_at", [0, 3])
def test_engine_rows_of_every_kind_decode_as_each_alone(tiny_base, join_at):
    bank = bank_from_experts(_experts(tiny_base))
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


def test_the_config_chooses_the_prompt_kind():
    from orchestrator.config import ConfigError, load_config

    assert load_config("tests/tiny.yaml").prompt.kind == "input"
    deep = load_config("tests/tiny.yaml", ["prompt.kind=deep", "prompt.num_virtual_tokens=16"]).prompt
    assert (deep.kind, deep.num_virtual_tokens) == ("deep", 16)
    with pytest.raises(ConfigError, match=r"prompt\.kind"):
        load_config("tests/tiny.yaml", ["prompt.kind=prefix"])
    with pytest.raises(ConfigError, match="ZeRO trains input prompts only"):
        load_config("tests/tiny.yaml", ["prompt.kind=deep", "strategy=deepspeed"])
