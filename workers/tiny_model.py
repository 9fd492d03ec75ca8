"""A tiny random causal LM with a tokenizer trained in code: for tests, benchmark smoke runs, no downloads.

The model is random, so its answers mean nothing; what it gives is the real code path (the layout of one of
the families users bring, a real tokenizer, a folder loadable by path like any hub model) in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "You are a person from Germany. Answer the way most people in Germany would answer.",
    "Question: Do you think people can be trusted? A. Yes B. No C. Don't know",
    "Answer with the letter of one option. Answer: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "How important is religion in your life? Very important, somewhat important, not too important.",
    "Is the economic situation in our country good or bad? Agree, disagree, refuse to answer.",
] * 20


def tiny_tokenizer():
    """A byte-level BPE tokenizer of 400 tokens trained on a few survey-like sentences (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


# A window shorter than the tests' prompts and personas, so sliding-window layers really slide.
TINY_WINDOW = 16
_LAYERS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# Three layers: a soft prompt reaches a question's answer through windows of 16 (2 x 15 + 16 positions).
_ALL_SLIDING = _LAYERS | {"sliding_window": TINY_WINDOW, "num_hidden_layers": 3}
_MIXED = {"sliding_window": TINY_WINDOW, "layer_types": ["sliding_attention", "full_attention"]}
# The families users commonly bring (transformers model types), each with what makes it itself: GQA,
# sliding windows (every layer, or mixed with full layers), Gemma's scaled embeddings and soft-capping.
FAMILIES: dict[str, dict] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "llama": _LAYERS,
    "qwen2": _LAYERS | {"use_sliding_window": True, "sliding_window": TINY_WINDOW, "max_window_layers": 1},
    "qwen3": _LAYERS | {"head_dim": 16},
    "mistral": _ALL_SLIDING,
    "phi3": _ALL_SLIDING,
    "gemma2": _LAYERS | {"head_dim": 16} | _MIXED,
    "gemma3_text": _LAYERS | {"head_dim": 16} | _MIXED,
    "olmo2": _LAYERS,
    "olmo3": _LAYERS | _MIXED,
    "smollm3": _LAYERS,
    "gpt_neox": {k: v for k, v in _LAYERS.items() if k != "num_key_value_heads"},
}


def save_tiny_model(family: str, folder: Path) -> Path:
    """Save a 2-layer, width-64 random model of a `FAMILIES` layout and its tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed({"gpt2": 0, "llama": 1}.get(family, 2))
    special = {"pad_token_id": tokenizer.pad_token_id}
    special |= {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **FAMILIES[family], **special)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
