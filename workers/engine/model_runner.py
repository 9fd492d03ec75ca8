"""The model runner: every forward pass of the engine on the frozen base, and the token choice after it.

- prefill: one forward over the prompts of new requests, each member a row with its own expert's soft prompt
  (left-padded; rows that are all the plain base model take no prompt slots). A deep-prefix expert's row starts
  its cache with its prefix. After prefill a row's soft prompt lives in its KV cache, so a new bank can be
  swapped in between any two steps and running requests finish with the prompts they started on.
- decode: one forward over the running rows, each fed its request's last picked token at the position after
  its real length (padding aside); the cache grows in place.
- opinions: a committee's mixed option distribution for a batch of questions (one forward, or one an expert).
- pick: each request's member rows mixed by weight and its next token chosen (`workers.engine.sampling`).

Every forward takes `workers.attention`'s masks: a sliding window counts a row's real slots, so padding and a
neighbour's prompt slots change nothing; a decode sees only the slots the sliding layers still hold.

This is the one place that calls the model: a GPU path (CUDA graphs, a paged cache) would change it alone. It
never calls the tokenizer (the engine thread must not share a fast tokenizer): the pad and option-letter ids are
read once, at construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from workers.attention import forward_mask, layer_kinds, windowed
from workers.base_model import FrozenBase
from workers.committees import committee_distributions
from workers.engine.kv_cache import with_spare_slots
from workers.engine.requests import Generation, Opinion, TokenLogprobs, is_greedy
from workers.engine.sampling import mixed_distributions, pick_tokens, token_logprobs
from workers.prefix import cache_kwarg, start_cache
from workers.prompts import NO_EXPERT, SoftPromptBank, prompted_inputs
from workers.scoring import left_pad, option_token_ids


def stop_token_ids(base: FrozenBase) -> set[int]:
    """The tokens that end a text: the tokenizer's EOS and any the model's generation config names."""
    ids = {base.tokenizer.eos_token_id}
    configured = getattr(base.model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids if i is not None}


class ModelRunner:
    """The forward passes of one frozen base: prefill, decode, opinions; and the token picks after decode."""

    def __init__(self, base: FrozenBase, per_expert: bool = False):
        self.base = base
        self.per_expert = per_expert  # opinions: one forward per expert (benchmarks only)
        self.letter_ids = option_token_ids(base.tokenizer)  # here, so the engine thread needs no tokenizer
        self.kinds = layer_kinds(base.model.config)  # read once: reading them costs ~0.4 ms

    def prefill(self, batch: Sequence[Generation]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward over the prompts of new requests (each member a row): logits, cache and mask."""
        experts, prompts = [], []
        for g in batch:
            experts += [e for e, _ in g.request.members]
            prompts += [g.request.prompt_ids] * g.rows
        ids, mask = left_pad(prompts, self.base.tokenizer.pad_token_id)
        device = self.base.device
        # Rows that are all the plain base model take no prompt slots, as in static batching. Every running
        # row then has its bank's width of prompt slots or none: merged caches pad on the left either way.
        bank = None if all(e == NO_EXPERT for e in experts) else batch[0].bank
        inputs = prompted_inputs(
            self.base.model, ids.to(device), mask.to(device), bank, torch.tensor(experts)
        )
        # A row with a deep prefix starts its cache with it: decoding then continues from that cache as usual.
        cache = start_cache(self.base.model, inputs)
        out = self.base.model(
            **windowed(self.base.model, inputs),
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg(self.base.model): cache},
        )
        return out.logits[:, -1].float(), with_spare_slots(cache), inputs["attention_mask"]

    def decode(
        self, requests: Sequence[Generation], cache: DynamicCache, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the rows of `requests` (their cache and mask), each fed its request's last picked
        token: rows x V logits, and the mask grown by one slot. The cache grows in place."""
        device = self.base.device
        next_ids = torch.tensor([[g.next_token] for g in requests for _ in range(g.rows)], device=device)
        # A new token's position is the number of slots its row attends to so far (prompt and padding aside).
        position_ids = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(len(next_ids), 1)], dim=1)
        sliding = [
            layer.keys.shape[-2] + 1 for layer, slides in zip(cache.layers, self.kinds.sliding) if slides
        ]
        out = self.base.model(
            input_ids=next_ids,
            attention_mask=forward_mask(
                self.base.model, mask, 1, sliding[0] if sliding else None, self.kinds
            ),
            position_ids=position_ids,
            use_cache=True,
            **{cache_kwarg(self.base.model): cache},
        )
        return out.logits[:, -1].float(), mask

    def opinions(self, bank: SoftPromptBank | None, opinions: Sequence[Opinion]) -> list[np.ndarray]:
        """Each opinion's committee's mixed option distribution (one forward, or one an expert)."""
        return committee_distributions(
            self.base,
            bank,
            [o.question for o in opinions],
            [o.members for o in opinions],
            self.per_expert,
            self.letter_ids,
        )

    @staticmethod
    def mix(logits: torch.Tensor, running: Sequence[Generation]) -> torch.Tensor:
        """Each running request's next-token distribution: its member rows of `logits` mixed by weight."""
        device = logits.device
        owner = torch.tensor([i for i, g in enumerate(running) for _ in range(g.rows)], device=device)
        weight = torch.tensor([w for g in running for w in g.weights], device=device)
        temperature = torch.tensor(
            [0.0 if is_greedy(g.request) else g.request.temperature for g in running for _ in g.weights],
            device=device,
        )
        return mixed_distributions(logits, owner, weight, temperature, len(running))

    @staticmethod
    def pick(
        mixed: torch.Tensor, running: Sequence[Generation]
    ) -> tuple[list[bool], list[int], list[TokenLogprobs | None]]:
        """Each request's next token and, if it asked, its log probabilities; and whether its distribution is
        finite (one that is not draws nothing). One check and one pick for the whole batch."""
        finite = torch.isfinite(mixed).all(-1).tolist()
        generators = [g.generator if ok else None for g, ok in zip(running, finite)]
        tokens = pick_tokens(mixed, generators, [g.request.top_p for g in running])
        logprobs = token_logprobs(
            mixed, tokens, [g.request.logprobs if ok else None for g, ok in zip(running, finite)]
        )
        return finite, tokens, logprobs
