"""A tiny random causal LM with a tokenizer trained in code: for tests, benchmark smoke runs, no downloads.

The model is random, so its answers mean nothing; what it gives is the real code path (GPT-2 or Llama
layout, a real tokenizer, a folder loadable by path like any hub model) in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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


def save_tiny_model(family: Literal["gpt2", "llama"], folder: Path) -> Path:
    """Save a 2-layer, width-64 random model of the given layout and its tokenizer to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = tiny_tokenizer()
    torch.manual_seed({"gpt2": 0, "llama": 1}[family])
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
