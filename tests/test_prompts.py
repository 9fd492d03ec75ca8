"""The soft-prompt bank: per-row prompts in one batch, persistence, PEFT export, base-model identity."""

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from workers.base_model import fingerprint, load_frozen_base
from workers.expert_file import Expert, ExpertMeta, PromptMismatchError, load_expert, save_expert
from workers.peft_export import export_peft_adapter
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
