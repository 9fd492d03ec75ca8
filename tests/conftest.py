"""Shared fixtures: tiny random GPT-2 and Llama models with a tokenizer trained here, and the survey data."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "goqa"
OPINIONS = SHARED_DATA / "opinions.jsonl"


def free_ports(n: int = 1) -> list[int]:
    """n distinct free ports on 127.0.0.1 (held open together so no two are the same)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


CORPUS = [
    "You are a person from Germany. Answer the way most people in Germany would answer.",
    "Question: Do you think people can be trusted? A. Yes B. No C. Don't know",
    "Answer with the letter of one option. Answer: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "How important is religion in your life? Very important, somewhat important, not too important.",
    "Is the economic situation in our country good or bad? Agree, disagree, refuse to answer.",
] * 20


def _tokenizer():
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


def _save_tiny(family: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = _tokenizer()
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
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of a tiny random GPT-2 and Llama, loadable by path like any hub model."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: _save_tiny(family, root / family) for family in ("gpt2", "llama")}


@pytest.fixture(params=["gpt2", "llama"])
def tiny_base(request, tiny_model_dirs):
    """A frozen tiny base model of each layout."""
    from workers.base_model import load_frozen_base

    return load_frozen_base(str(tiny_model_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]
