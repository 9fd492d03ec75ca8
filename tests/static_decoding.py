"""Static batching, the engine tests' reference: a batch of committee requests decoded to its longest request.

Every member of every request is a row of one batch, each row prefixed by its own expert's soft prompt. One
forward step (with the KV cache) gives every row its next-token distribution; each request mixes its members'
distributions by weight, picks one token (greedy at temperature 0, else sampled with its own seeded generator)
and appends it to all of its rows. It is built from the engine's own primitives (`workers.engine`), so on greedy
requests the engine must give exactly its tokens, whatever joins or leaves its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.base_model import FrozenBase
from workers.committees import committee_weights
from workers.engine import (
    Decoded,
    DecodeRequest,
    check_request,
    is_greedy,
    mixed_distributions,
    pick_tokens,
    sampler,
    stop_token_ids,
    with_spare_slots,
)
from workers.prefix import cache_kwarg, start_cache
from workers.prompts import NO_EXPERT, SoftPromptBank, prompted_inputs
from workers.scoring import left_pad


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
        weights = committee_weights([w for _, w in request.members])
        for (expert, _), w in zip(request.members, weights):
            owner.append(i)
            expert_idx.append(expert)
            weight.append(w)
            prompts.append(request.prompt_ids)
    ids, mask = left_pad(prompts, base.tokenizer.pad_token_id)
    if all(e == NO_EXPERT for e in expert_idx):
        bank = None  # the plain base model throughout: no prompt slots at all
    inputs = prompted_inputs(base.model, ids.to(device), mask.to(device), bank, torch.tensor(expert_idx))
    mask = inputs["attention_mask"]
    kwarg = cache_kwarg(base.model)
    # Filled in place by every forward step, after any deep prefixes.
    cache = with_spare_slots(start_cache(base.model, inputs))
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
        # Finished requests have empty rows here: they draw nothing (their generators stay where they are).
        live_generators = [g if finish[i] is None else None for i, g in enumerate(generators)]
        picks = pick_tokens(mixed, live_generators, [r.top_p for r in requests])
        picked = {}
        for i in live:
            token = picks[i]
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
