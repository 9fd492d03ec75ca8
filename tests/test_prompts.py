"""The soft-prompt bank: per-row prompts and deep prefixes in one batch, persistence, PEFT export, base-model
identity."""

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tests.conftest import EVERY_KIND, PROMPTS, experts_of_every_kind, random_expert, token_ids
from workers.base_model import fingerprint, load_frozen_base
from workers.expert_file import Expert, ExpertMeta, PromptMismatchError, load_expert, save_expert
from workers.peft_export import PeftExportError, export_peft_adapter
from workers.prompts import NO_EXPERT, SoftPromptBank, bank_from_experts, persona_text, prompted_inputs
from workers.scoring import encode_question, left_pad, option_distributions

TEXTS = ["Do you think people can be trusted?", "Answer: A", "How important is religion in your life? Very"]


def _last_logits(base, bank, texts, expert_idx):
    ids, mask = left_pad([base.tokenizer.encode(t) for t in texts], base.tokenizer.pad_token_id)
    inputs = prompted_inputs(base.model, ids, mask, bank, torch.tensor(expert_idx) if bank else None)
    with torch.no_grad():
        return base.model(**inputs).logits[:, -1]


def _meta(base, culture="Germany", length=4):
    return ExpertMeta(
        culture, "DE", length, base.hidden_size, base.name, base.fingerprint, {"val_alignment": 0.7}
    )


@pytest.mark.parametrize("length", [1, 5])
def test_mixed_batch_rows_match_each_row_alone(tiny_base, length):
    bank = SoftPromptBank.initialise(tiny_base, ["Germany", "Japan"], length, init="random", seed=3)
    experts = [0, NO_EXPERT, 1]
    mixed = _last_logits(tiny_base, bank, TEXTS, experts)
    for row, (text, expert) in enumerate(zip(TEXTS, experts)):
        alone = _last_logits(tiny_base, bank, [text], [expert])[0]
        torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=1e-4)
    # A row with no expert is exactly the plain base model, whatever its neighbours carry.
    plain = _last_logits(tiny_base, None, [TEXTS[1]], [])[0]
    torch.testing.assert_close(mixed[1], plain, atol=1e-5, rtol=1e-4)
    # And the prompt matters: the same text under two experts gives different logits.
    two = _last_logits(tiny_base, bank, [TEXTS[0], TEXTS[0]], [0, 1])
    assert not torch.allclose(two[0], two[1])


def test_only_used_experts_get_gradients(tiny_base):
    bank = SoftPromptBank.initialise(tiny_base, ["Germany", "Japan", "Kenya"], 3, init="random")
    ids, mask = left_pad([tiny_base.tokenizer.encode(TEXTS[0])] * 2, tiny_base.tokenizer.pad_token_id)
    inputs = prompted_inputs(tiny_base.model, ids, mask, bank, torch.tensor([2, 0]))
    tiny_base.model(**inputs).logits.sum().backward()
    assert bank.prompts[0].grad is not None and bank.prompts[2].grad is not None
    assert bank.prompts[1].grad is None  # so AdamW leaves Japan and its moments alone


def test_persona_init_embeds_the_persona_text(tiny_base):
    bank = SoftPromptBank.initialise(tiny_base, ["Kenya"], 6)
    ids = tiny_base.tokenizer(persona_text("Kenya"), add_special_tokens=False)["input_ids"]
    table = tiny_base.model.get_input_embeddings().weight
    torch.testing.assert_close(bank.weight[0, 0], table[ids[0]])
    assert bank.weight.shape == (1, 6, tiny_base.hidden_size)
    grown = bank.copy_expert("Kenya", "Tanzania")
    assert grown.cultures == ["Kenya", "Tanzania"]
    torch.testing.assert_close(grown.weight[1], bank.weight[0])
    with pytest.raises(ValueError, match="unknown prompt init"):
        SoftPromptBank.initialise(tiny_base, ["Kenya"], 6, init="zeros")


def test_save_load_roundtrip_keeps_prompt_and_metadata(tiny_base, tmp_path):
    prompt = torch.randn(4, tiny_base.hidden_size)
    path = save_expert(tmp_path / "germany.safetensors", Expert(prompt, _meta(tiny_base)))
    loaded = load_expert(path, tiny_base)
    torch.testing.assert_close(loaded.prompt, prompt)
    assert loaded.meta == _meta(tiny_base)
    bank = bank_from_experts([loaded])
    assert bank.cultures == ["Germany"] and bank.weight.shape == (1, 4, tiny_base.hidden_size)


def test_loading_onto_another_base_model_is_refused(tiny_model_dirs, tmp_path):
    gpt2 = load_frozen_base(str(tiny_model_dirs["gpt2"]), device="cpu")
    llama = load_frozen_base(str(tiny_model_dirs["llama"]), device="cpu")
    path = save_expert(tmp_path / "g.safetensors", Expert(torch.zeros(4, 64), _meta(gpt2)))
    with pytest.raises(PromptMismatchError, match="was trained for base model"):
        load_expert(path, llama)


def test_fingerprint_is_stable_across_loads_and_dtypes(llama_dir):
    a = load_frozen_base(str(llama_dir), device="cpu")
    b = load_frozen_base(str(llama_dir), dtype="bfloat16", device="cpu")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    changed = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight.mul_(2)
    assert fingerprint(changed) != a.fingerprint


def test_base_stays_frozen(tiny_base):
    assert not any(p.requires_grad for p in tiny_base.model.parameters())
    assert not tiny_base.model.training


def test_peft_adapter_export_gives_the_same_logits(tiny_model_dirs, tmp_path):
    for family, folder in tiny_model_dirs.items():
        base = load_frozen_base(str(folder), device="cpu")
        expert = Expert(torch.randn(5, base.hidden_size) * 0.5, _meta(base, length=5))
        adapter = export_peft_adapter(expert, base.model, tmp_path / family)
        bank = bank_from_experts([expert])
        ids = torch.tensor([base.tokenizer.encode(TEXTS[0])])
        ours = base.model(
            **prompted_inputs(base.model, ids, torch.ones_like(ids), bank, torch.tensor([0]))
        ).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter)
        with torch.no_grad():
            theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(ours[:, -ids.shape[1] :], theirs[:, -ids.shape[1] :], atol=1e-5, rtol=1e-4)


def _expert(base, culture, length, seed):
    prompt = torch.randn(length, base.hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.5
    return Expert(prompt, _meta(base, culture, length))


def test_experts_of_different_prompt_lengths_share_a_bank_and_score_as_each_alone(tiny_base):
    experts = [
        _expert(tiny_base, c, n, s) for s, (c, n) in enumerate([("Germany", 2), ("Japan", 7), ("Kenya", 4)])
    ]
    bank = bank_from_experts(experts)
    assert bank.lengths == [2, 7, 4] and bank.num_virtual_tokens == 7
    rows = [0, 1, NO_EXPERT, 2, 0]
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[2]]
    mixed = _last_logits(tiny_base, bank, texts, rows)
    for row, (text, expert) in enumerate(zip(texts, rows)):
        alone_bank = bank_from_experts([experts[expert]]) if expert != NO_EXPERT else None
        alone = _last_logits(tiny_base, alone_bank, [text], [0] if alone_bank else [])[0]
        torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="different prompt lengths"):
        _ = bank.weight


def test_option_distributions_with_mixed_prompt_lengths_equal_each_expert_alone(tiny_base):
    experts = [_expert(tiny_base, c, n, s) for s, (c, n) in enumerate([("Germany", 1), ("Japan", 6)])]
    bank = bank_from_experts(experts)
    questions = [encode_question(tiny_base.tokenizer, t, ["Yes", "No", "Maybe"]) for t in TEXTS[:2]]
    rows = [(q, e) for q in questions for e in (0, 1, NO_EXPERT)]
    together = option_distributions(tiny_base, bank, [q for q, _ in rows], [e for _, e in rows])
    for (question, expert), got in zip(rows, together):
        alone_bank = bank_from_experts([experts[expert]]) if expert != NO_EXPERT else None
        [alone] = option_distributions(tiny_base, alone_bank, [question], [0 if alone_bank else NO_EXPERT])
        np.testing.assert_allclose(got, alone, atol=1e-6)


def test_rows_of_every_kind_in_one_batch_match_each_row_alone(tiny_base):
    experts = experts_of_every_kind(tiny_base)
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
    bank = bank_from_experts(experts_of_every_kind(tiny_base))
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
    bank = bank_from_experts(experts_of_every_kind(tiny_base))
    ids, mask = left_pad([token_ids(tiny_base, PROMPTS[0])] * 2, tiny_base.tokenizer.pad_token_id)
    inputs = prompted_inputs(tiny_base.model, ids, mask, bank, torch.tensor([2, 1]))
    tiny_base.model(**inputs, use_cache=False).logits.sum().backward()
    assert bank.prefix(1).grad is not None and bank.prefix(2).grad is not None
    assert bool(bank.prefix(1).grad.abs().sum() > 0) and bool(bank.prompts[2].grad.abs().sum() > 0)
    assert bank.prefix(3).grad is None and bank.prompts[0].grad is None  # AdamW leaves them alone

    # A shared prefix learns from every row that uses it; frozen, it learns from none.
    shared = random_expert(tiny_base, "all", 0, 3, seed=9).prefix
    prompts = [e.prompt for e in experts_of_every_kind(tiny_base)[:2]]
    tied = SoftPromptBank(["Germany", "Japan"], prompts, shared_prefix=shared)
    assert tied.prefix(0) is tied.prefix(1) is tied.shared_prefix
    assert tied.units() == [["Germany", "Japan"]]
    inputs = prompted_inputs(tiny_base.model, ids[:1], mask[:1], tied, torch.tensor([1]))
    tiny_base.model(**inputs, use_cache=False).logits.sum().backward()
    assert tied.shared_prefix.grad is not None
    tied.shared_prefix.requires_grad_(False)
    assert tied.units() == [["Germany"], ["Japan"]]  # on a frozen prefix each expert trains alone


def test_copy_expert_copies_both_parts_and_keeps_a_shared_prefix_shared(tiny_base):
    bank = bank_from_experts(experts_of_every_kind(tiny_base))
    grown = bank.copy_expert("Kenya", "Tanzania")
    torch.testing.assert_close(grown.prompts[4], bank.prompts[2])
    torch.testing.assert_close(grown.prefix(4), bank.prefix(2))
    assert grown.prefix(4) is not grown.prefix(2)  # a copy, trained on its own
    tied = SoftPromptBank(["Germany"], [torch.zeros(2, tiny_base.hidden_size)], shared_prefix=bank.prefix(1))
    tied.shared_prefix.requires_grad_(False)
    grown = tied.copy_expert("Germany", "Austria")
    assert grown.prefix(1) is grown.shared_prefix and not grown.shared_prefix.requires_grad


def test_save_load_roundtrip_of_every_kind(tiny_base, tmp_path):
    for expert in experts_of_every_kind(tiny_base):
        path = save_expert(tmp_path / f"{expert.meta.culture}.safetensors", expert)
        loaded = load_expert(path, tiny_base)
        torch.testing.assert_close(loaded.prompt, expert.prompt)
        if expert.prefix is None:
            assert loaded.prefix is None and loaded.meta.kind == "input"
        else:
            torch.testing.assert_close(loaded.prefix, expert.prefix)
        n, p = EVERY_KIND[expert.meta.culture]
        assert (loaded.meta.num_virtual_tokens, loaded.meta.prefix_tokens) == (n, p)
        assert loaded.meta.kind == {(True, False): "input", (False, True): "deep"}.get(
            (n > 0, p > 0), "composed"
        )
    bank = bank_from_experts([load_expert(tmp_path / f"{c}.safetensors") for c in EVERY_KIND])
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
    expert = random_expert(tiny_base, "Japan", 0, 3, seed=1)
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
        deep = random_expert(base, "Japan", 0, 5, seed=3)
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
            export_peft_adapter(random_expert(base, "Kenya", 4, 3, seed=1), base.model, tmp_path / "composed")
