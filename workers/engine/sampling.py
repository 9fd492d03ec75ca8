"""Sampling: each request's next token from its committee's mixed distribution, and its log probabilities.

A request mixes its members' next-token distributions by weight (`mixed_distributions`) and picks one token:
greedy at temperature 0 (under GREEDY_BELOW), else drawn from its `top_p` nucleus with its own seeded generator
(`sampler`), on the CPU, so that a seed gives the same text on any device. A request that asks for `logprobs`
gets its token's log probability and the most likely tokens' (`token_logprobs`). Pure tensor functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.defaults import SEED_LIMIT
from workers.engine.requests import DecodeRequest, TokenLogprobs, is_greedy

LOGPROB_FLOOR = -9999.0  # the log probability reported for a token of probability 0 (JSON has no -inf)


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
