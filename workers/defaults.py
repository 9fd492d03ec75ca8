"""Defaults the experiment config and the HTTP schemas share with the engine, torch-free: they import them without
the model stack."""

from __future__ import annotations

EVAL_BATCH_SIZE = 16  # questions in one scoring forward pass (validation, evaluation)
MAX_LENGTH = 320  # tokens of an encoded question; longer ones keep their end (the options and the answer)
# Sentence embeddings of the text router: the embedded name, a folder or a hub id.
ROUTER_MODEL = "all-MiniLM-L6-v2"
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test shares of the questions
CHAMPION = "champion"  # the registry alias of each culture's best expert
SEED_LIMIT = 2**63  # seeds are in [0, 2**63), what torch.Generator.manual_seed takes without wrapping
MAX_TOP_LOGPROBS = 20  # alternatives a token's log probabilities may list (OpenAI's cap)
