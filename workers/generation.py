"""Joint committee decoding: the members of a committee decode one text together, token by token.

Every member of every request is a row of one batch, each row prefixed by its own expert's soft prompt.
One forward step (with the KV cache) gives every row its next-token distribution; each request mixes its
members' distributions by weight, picks one token (greedy at temperature 0, else sampled with its own
seeded generator) and appends that token to all of its rows. Requests for different experts, and
different requests, share the same forward passes. This is static batching (a batch decodes to its longest
request); `workers.engine.DecodeEngine` is the continuous-batching loop built from the same pieces.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.base_model import FrozenBase
from workers.committees import committee_weights
from workers.defaults import MAX_TOP_LOGPROBS, SEED_LIMIT
from workers.prefix import cache_kwarg, start_cache
from workers.prompts import NO_EXPERT, SoftPromptBank, prompted_inputs
from workers.scoring import left_pad

# Free cache slots a decode layer keeps: one copy of its cache every 32 steps, not every step.
SPARE_SLOTS = 32
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily: logits / ~0 would be inf, then NaN
LOGPROB_FLOOR = -9999.0  # the log probability reported for a token of probability 0 (JSON has no -inf)


@dataclass
class DecodeRequest:
    """One text to continue: its prompt tokens, its committee as (expert index or NO_EXPERT, weight).

    Sampling (temperature above 0) draws from the committee's mixed distribution, cut to its `top_p` nucleus.
    With `logprobs` k, each picked token carries its log probability and the k most likely tokens' (TokenLogprobs).
    """

    prompt_ids: list[int]
    members: list[tuple[int, float]]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    top_p: float = 1.0
    logprobs: int | None = None


@dataclass
class TokenLogprobs:
    """A picked token's log probability in its committee's mixed distribution, and the most likely tokens'."""

    logprob: float
    top: list[tuple[int, float]]  # (token, log probability), the most likely first


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


class SpareSlotsLayer(DynamicLayer):
    """A DynamicLayer that appends new keys and values into spare slots instead of concatenating.

    DynamicLayer copies a layer's whole cache at every decode step (torch.cat); this one writes the step's
    keys and values in place and copies only when its slots run out, or when `keys`/`values` were replaced
    from outside (the engine merges, reorders and trims caches by assigning them). `keys` and `values` stay
    plain [batch, heads, length, dim] tensors (views), so attention sees the same numbers.
    """

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # keys and values, with free slots after them
    _views: tuple[torch.Tensor, torch.Tensor] | None = None  # the `keys` and `values` this layer last set

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        length, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        replaced = self._views is None or self._views[0] is not self.keys or self._views[1] is not self.values
        if replaced or self._buffers[0].shape[-2] < end:
            self._buffers = tuple(self._grown(t, end) for t in (self.keys, self.values))
        keys, values = self._buffers
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    @staticmethod
    def _grown(t: torch.Tensor, needed: int) -> torch.Tensor:
        buffer = t.new_empty((*t.shape[:-2], needed + SPARE_SLOTS, t.shape[-1]))
        buffer[..., : t.shape[-2], :] = t
        return buffer


def with_spare_slots(cache: DynamicCache) -> DynamicCache:
    """The same cache (any deep prefixes in it kept), its full-attention layers appending into spare slots."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = SpareSlotsLayer  # a subclass with methods only: the layer's state carries over
    return cache


def check_request(request: DecodeRequest) -> None:
    """Refuse a request that cannot be decoded, with one clear line (ValueError)."""
    committee_weights([w for _, w in request.members])
    if request.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not math.isfinite(request.temperature):
        raise ValueError(f"temperature must be a finite number, got {request.temperature}")
    if request.seed is not None and not 0 <= request.seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {request.seed}")
    if not 0 <= request.top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {request.top_p}")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}")


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


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request that asks for several (OpenAI's `n`): the request's own seed for
    the first, so that it answers as the same request alone, then seeds derived from it (None stays None)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_LIMIT


def mixed_distributions(
    logits: torch.Tensor, owner: torch.Tensor, weight: torch.Tensor, temperature: torch.Tensor, n: int
) -> torch.Tensor:
    """n x V next-token distributions (on the logits' device): each request's member rows mixed by weight.

    `owner`, `weight` and `temperature` are per row; a greedy row has temperature 0 and mixes its members'
    plain distributions, a sampled one those at its temperature.
    """
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / scale[:, None], dim=-1) * weight[:, None]
    return torch.zeros(n, probs.shape[1], device=logits.device).index_add_(0, owner, probs)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """A distribution cut to its nucleus: the fewest most likely tokens whose mass reaches `top_p` (top-p sampling).

    The tokens outside get probability 0 and the rest keep theirs (not renormalised: torch.multinomial does not
    need it). The most likely token always stays, so `top_p` 0 picks it; ties keep the lower token id first.
    """
    if top_p >= 1:
        return probs
    ranked, order = probs.sort(descending=True, stable=True)
    before = ranked.cumsum(0) - ranked  # the mass of the tokens ranked above each
    keep = before < top_p * ranked.sum()
    keep[0] = True
    return torch.zeros_like(probs).index_put_((order[keep],), ranked[keep])


def pick_tokens(
    mixed: torch.Tensor, generators: Sequence[torch.Generator | None], top_ps: Sequence[float] | None = None
) -> list[int]:
    """Each request's next token from its row of `mixed`: greedy where its generator is None, else sampled
    from the row's `top_ps` nucleus (the whole row by default).

    The greedy rows are one argmax on the device and one small copy to the host (not a call per row, nor
    the whole n x V table copied); only the sampled rows travel, to be drawn on the CPU with their own
    seeded generators, so that a seed gives the same text on any device.
    """
    tokens = mixed.argmax(-1).tolist()
    sampled = [i for i, generator in enumerate(generators) if generator is not None]
    if sampled:
        for i, row in zip(sampled, mixed[sampled].cpu()):
            row = nucleus(row, top_ps[i]) if top_ps is not None else row
            tokens[i] = int(torch.multinomial(row, 1, generator=generators[i]))
    return tokens


def token_logprobs(
    mixed: torch.Tensor, tokens: Sequence[int], wanted: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """For each row whose `wanted` is k (not None): the log probability of its picked token in `mixed` and the
    k most likely tokens with theirs. One top-k on the device and one copy to the host for all the rows."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(wanted)
    if not rows:
        return out
    logs = mixed[rows].clamp_min(0).log().clamp_min(LOGPROB_FLOOR)
    picked = logs.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logs.device)).squeeze(1)
    k = max(wanted[i] for i in rows)
    values = ids = [[] for _ in rows]
    if k:
        top = logs.topk(k, dim=-1)
        values, ids = top.values.tolist(), top.indices.tolist()
    for slot, (i, logprob) in enumerate(zip(rows, picked.tolist())):
        out[i] = TokenLogprobs(logprob, list(zip(ids[slot], values[slot]))[: wanted[i]])
    return out


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
