"""Joint committee decoding: the members of a committee decode one text together, token by token.

Every member of every request is a row of one batch, each row prefixed by its own expert's soft prompt.
One forward step (with the KV cache) gives every row its next-token distribution; each request mixes its
members' distributions by weight, picks one token (greedy at temperature 0, else sampled with its own
seeded generator) and appends that token to all of its rows. Requests for different experts, and
different requests, share the same forward passes. This is static batching (a batch decodes to its longest
request); `workers.engine.DecodeEngine` is the continuous-batching loop built from the same pieces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from workers.base_model import FrozenBase
from workers.prefix import cache_kwarg, start_cache
from workers.prompts import NO_EXPERT, SoftPromptBank, prompted_inputs
from workers.scoring import left_pad

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily: logits / ~0 would be inf, then NaN
SEED_LIMIT = 2**63  # seeds are in [0, 2**63), what torch.Generator.manual_seed takes without wrapping


@dataclass
class DecodeRequest:
    """One text to continue: its prompt tokens, its committee as (expert index or NO_EXPERT, weight)."""

    prompt_ids: list[int]
    members: list[tuple[int, float]]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Decoded:
    """The new tokens of one request and why decoding stopped: `stop` (a stop token) or `length`."""

    token_ids: list[int]
    finish_reason: str


def stop_token_ids(base: FrozenBase) -> set[int]:
    """The tokens that end a text: the tokenizer's EOS and any the model's generation config names."""
    ids = {base.tokenizer.eos_token_id}
    configured = getattr(base.model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids if i is not None}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """A conversation as the model's prompt: its chat template where it has one, else plain role lines."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def check_request(request: DecodeRequest) -> None:
    """Refuse a request that cannot be decoded, with one clear line (ValueError)."""
    if not request.members:
        raise ValueError("empty committee")
    if not sum(w for _, w in request.members) > 0:
        raise ValueError("committee weights must sum to a positive number")
    if request.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not math.isfinite(request.temperature):
        raise ValueError(f"temperature must be a finite number, got {request.temperature}")
    if request.seed is not None and not 0 <= request.seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {request.seed}")


def is_greedy(request: DecodeRequest) -> bool:
    """Whether a request picks the most likely token (temperature under GREEDY_BELOW) rather than sampling."""
    return request.temperature < GREEDY_BELOW


def sampler(request: DecodeRequest) -> torch.Generator | None:
    """The request's own seeded generator when it samples (a random seed if it gave none), else None."""
    if is_greedy(request):
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(request.seed if request.seed is not None else int(torch.seed() % SEED_LIMIT))
    return generator


def mixed_distributions(
    logits: torch.Tensor, owner: torch.Tensor, weight: torch.Tensor, temperature: torch.Tensor, n: int
) -> torch.Tensor:
    """n x V next-token distributions (on the CPU): each request's member rows mixed by weight.

    `owner`, `weight` and `temperature` are per row; a greedy row has temperature 0 and mixes its members'
    plain distributions, a sampled one those at its temperature.
    """
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / scale[:, None], dim=-1) * weight[:, None]
    return torch.zeros(n, probs.shape[1], device=logits.device).index_add_(0, owner, probs).cpu()


def pick(mixed: torch.Tensor, generator: torch.Generator | None) -> int:
    """The next token from one request's mixed distribution: greedy without a generator, else sampled."""
    if generator is None:
        return int(mixed.argmax())
    return int(torch.multinomial(mixed, 1, generator=generator))


@torch.no_grad()
def committee_generate(
    base: FrozenBase,
    bank: SoftPromptBank | None,
    requests: Sequence[DecodeRequest],
    stop_ids: set[int] | None = None,
) -> list[Decoded]:
    """Decode every request with its committee, all requests and members as rows of one batch."""
    if not requests:
        return []
    stop_ids = stop_token_ids(base) if stop_ids is None else stop_ids
    device = base.device
    # Row r belongs to request owner[r] and carries expert expert_idx[r] with mixing weight weight[r].
    owner, expert_idx, weight, prompts = [], [], [], []
    for i, request in enumerate(requests):
        try:
            check_request(request)
        except ValueError as error:
            raise ValueError(f"request {i}: {error}") from None
        total = sum(w for _, w in request.members)
        for expert, w in request.members:
            owner.append(i)
            expert_idx.append(expert)
            weight.append(w / total)
            prompts.append(request.prompt_ids)
    ids, mask = left_pad(prompts, base.tokenizer.pad_token_id)
    if all(e == NO_EXPERT for e in expert_idx):
        bank = None  # the plain base model throughout: no prompt slots at all
    inputs = prompted_inputs(base.model, ids.to(device), mask.to(device), bank, torch.tensor(expert_idx))
    mask = inputs["attention_mask"]
    kwarg = cache_kwarg(base.model)
    cache = start_cache(base.model, inputs)  # filled in place by every forward step, after any deep prefixes
    out = base.model(**inputs, use_cache=True, logits_to_keep=1, **{kwarg: cache})
    logits = out.logits[:, -1].float()

    generators = [sampler(request) for request in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    owner_t = torch.tensor(owner, device=device)
    weight_t = torch.tensor(weight, device=device)
    temperature_t = torch.tensor(
        [0.0 if is_greedy(requests[o]) else requests[o].temperature for o in owner], device=device
    )
    live = list(range(len(requests)))  # requests still decoding, in the order of their rows
    while True:
        mixed = mixed_distributions(logits, owner_t, weight_t, temperature_t, len(requests))
        picked = {}
        for i in live:
            token = pick(mixed[i], generators[i])
            if token in stop_ids:
                finish[i] = "stop"
                continue
            tokens[i].append(token)
            picked[i] = token
            if len(tokens[i]) >= requests[i].max_new_tokens:
                finish[i] = "length"
        live = [i for i in live if finish[i] is None]
        if not live:
            break
        # Drop the rows of finished requests from the batch and the cache: they cost nothing from here on.
        keep = torch.tensor([r for r, o in enumerate(owner) if finish[o] is None], device=device)
        if len(keep) < len(owner):
            cache.reorder_cache(keep)
            mask, owner_t, weight_t, temperature_t = (
                mask[keep],
                owner_t[keep],
                weight_t[keep],
                temperature_t[keep],
            )
            owner = [owner[r] for r in keep.tolist()]
        next_ids = torch.tensor([[picked[o]] for o in owner], device=device)
        # A new token's position is the number of slots its row attends to so far (prompt and padding aside).
        position_ids = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(len(owner), 1)], dim=1)
        out = base.model(
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{kwarg: cache},
        )
        logits = out.logits[:, -1].float()
    return [Decoded(t, f or "length") for t, f in zip(tokens, finish)]
