"""The soft-prompt bank: one trainable prompt per culture, prepended row by row to a frozen model's input.

An expert has an input prompt (L_i x D embeddings before its row's tokens; L_i may be 0) and/or a deep
prefix (L_p virtual keys and values at every layer, `workers.prefix`). Input-only is classic prompt
tuning, deep-only prefix tuning, and both a composed expert (e.g. a shared deep prefix + its own tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache, PreTrainedModel

from workers.base_model import FrozenBase
from workers.cultures import SHARED
from workers.expert_file import Expert, ExpertMeta, described
from workers.prefix import cache_kwarg, prefix_cache, random_prefix, text_prefix
from workers.prompt_rows import PromptRows

NO_EXPERT = -1  # the expert index of a row that gets no prompt (the plain base model)


def persona_text(culture: str) -> str:
    """The hard-text persona naming a culture: the paper's own approach, and the default prompt init."""
    if culture == SHARED:  # the culture-blind prior starts from a persona of no culture in particular
        return (
            "You are a person answering a survey. Answer the way most people around the world would answer."
        )
    return f"You are a person from {culture}. Answer the way most people in {culture} would answer."


def _parameter(t: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().float(), requires_grad=requires_grad)


class SoftPromptBank(nn.Module):
    """E experts, one a culture: each an input prompt (L_i x D, L_i may be 0) and optionally a deep prefix.

    Each expert's parts are their own Parameters, so that an expert with no rows in a step gets no gradient
    (None, not zeros) and AdamW leaves it and its moments untouched: packed training of K experts is then
    exactly K separate trainings. Lengths may differ between experts. With `shared_prefix`, every expert
    that has no prefix of its own uses that one Parameter (tied: it learns from all their rows; freeze it
    with `bank.shared_prefix.requires_grad_(False)` to train only the experts' own parts on top of it).
    `weight` gives the input prompts of a bank of one length as one E x L x D tensor.
    """

    def __init__(
        self,
        cultures: list[str],
        prompts: torch.Tensor | Sequence[torch.Tensor],
        prefixes: Sequence[torch.Tensor | None] | None = None,
        shared_prefix: torch.Tensor | None = None,
    ):
        super().__init__()
        if len(prompts) != len(cultures) or any(p.dim() != 2 for p in prompts):
            shapes = [tuple(p.shape) for p in prompts]
            raise ValueError(
                f"prompts must be E x L x D (or E of L_e x D) with E={len(cultures)}, got {shapes}"
            )
        if len({p.shape[1] for p in prompts}) > 1:
            raise ValueError(
                f"prompts of one bank need one width, got {sorted({p.shape[1] for p in prompts})}"
            )
        own = [None] * len(cultures) if prefixes is None else list(prefixes)
        if len(own) != len(cultures):
            raise ValueError(f"{len(own)} prefixes for {len(cultures)} experts")
        given = ([shared_prefix] if shared_prefix is not None else []) + [p for p in own if p is not None]
        if any(p.dim() != 5 for p in given) or len({tuple(p.shape[1:]) for p in given}) > 1:
            raise ValueError(
                "prefixes must be L_p x num_layers x 2 x num_key_value_heads x head_dim, of one cache shape; "
                f"got {[tuple(p.shape) for p in given]}"
            )
        self.cultures = list(cultures)
        self.prompts = nn.ParameterList(_parameter(p) for p in prompts)
        self.prefixes = nn.ParameterList(_parameter(p) for p in given)
        # Each expert's index into `prefixes` (None: no prefix); the shared prefix, if any, is prefixes[0].
        self.has_shared_prefix = shared_prefix is not None
        # Train only the top `trained_layers` layers of the prefixes (None: all): `workers.prefix.prefix_cache`.
        self.trained_layers: int | None = None
        self.prefix_of: list[int | None] = []
        slot = int(self.has_shared_prefix)
        for p in own:
            if p is not None:
                self.prefix_of.append(slot)
                slot += 1
            else:
                self.prefix_of.append(0 if self.has_shared_prefix else None)

    @property
    def weight(self) -> torch.Tensor:
        if len(set(self.lengths)) > 1:
            raise ValueError(f"experts of different prompt lengths {sorted(set(self.lengths))} do not stack")
        return torch.stack(list(self.prompts))

    @property
    def lengths(self) -> list[int]:
        """Each expert's number of input-prompt tokens, in bank order."""
        return [p.shape[0] for p in self.prompts]

    @property
    def prefix_lengths(self) -> list[int]:
        """Each expert's number of deep-prefix tokens (0: none), in bank order."""
        return [0 if s is None else self.prefixes[s].shape[0] for s in self.prefix_of]

    @property
    def input_tokens(self) -> int:
        """The input-prompt slots a row gets: the longest expert's input prompt."""
        return max(self.lengths, default=0)

    @property
    def num_virtual_tokens(self) -> int:
        """The virtual slots a row may get: the longest prefix and the longest input prompt (positions they take)."""
        return max(self.prefix_lengths, default=0) + self.input_tokens

    @property
    def shared_prefix(self) -> nn.Parameter | None:
        return self.prefixes[0] if self.has_shared_prefix else None

    def prefix(self, index: int) -> nn.Parameter | None:
        """Expert `index`'s prefix (its own or the shared one), or None."""
        slot = self.prefix_of[index]
        return None if slot is None else self.prefixes[slot]

    def own_prefixes(self) -> list[torch.Tensor | None]:
        """Each expert's own prefix, None where it has none or uses the shared one (what rebuilding a bank takes)."""
        return [
            None if s is None or (self.has_shared_prefix and s == 0) else self.prefixes[s]
            for s in self.prefix_of
        ]

    def index(self, culture: str) -> int:
        return self.cultures.index(culture)

    def units(self) -> list[list[str]]:
        """Cultures that train as one: those sharing a trainable prefix together, every other culture alone."""
        groups: dict[tuple, list[str]] = {}
        for culture, slot in zip(self.cultures, self.prefix_of):
            tied = slot is not None and self.prefixes[slot].requires_grad and self.prefix_of.count(slot) > 1
            groups.setdefault(("prefix", slot) if tied else ("alone", culture), []).append(culture)
        return list(groups.values())

    def rows(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """The B x L x D input prompts of a batch, touching only the experts used.

        L is the longest input prompt in the bank; a shorter prompt fills the last slots, zeros before it (and
        zeros throughout where NO_EXPERT); `prompt_mask` says which slots are real.
        """
        width, first = self.input_tokens, self.prompts[0]
        if width == 0:  # deep-only experts: no slot, and no gradient path through the inputs
            return first.new_zeros(len(expert_idx), 0, first.shape[1]).detach()
        used = [int(e) for e in torch.unique(expert_idx) if e != NO_EXPERT]
        table = first.new_zeros(len(used) + 1, width, first.shape[1])
        if used:
            padded = [F.pad(self.prompts[e], (0, 0, width - self.prompts[e].shape[0], 0)) for e in used]
            table = torch.cat([table[:1], torch.stack(padded)])
        slot = {e: i + 1 for i, e in enumerate(used)} | {NO_EXPERT: 0}
        return table[torch.tensor([slot[int(e)] for e in expert_idx], device=table.device)]

    def prompt_mask(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """B x L: 1 on the slots of `rows` that hold a row's prompt, 0 on padding and NO_EXPERT rows."""
        lengths = torch.tensor([0 if int(e) == NO_EXPERT else self.lengths[int(e)] for e in expert_idx])
        slots = torch.arange(self.input_tokens)
        return (slots[None, :] >= self.input_tokens - lengths[:, None]).long()

    def prefix_rows(self, expert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's prefixes (B x P x N x 2 x H x Dh) and the B x P mask of real slots; None if no row has one.

        P is the longest prefix among the rows' experts; a shorter one fills the last slots (zeros before it,
        masked), so every row's prefix ends where its input begins. Only the prefixes used enter the graph.
        """
        slots = [None if int(e) == NO_EXPERT else self.prefix_of[int(e)] for e in expert_idx]
        used = sorted({s for s in slots if s is not None})
        if not used:
            return None
        width = max(self.prefixes[s].shape[0] for s in used)
        shape = self.prefixes[used[0]].shape[1:]
        padded = [
            torch.cat(
                [self.prefixes[s].new_zeros(width - self.prefixes[s].shape[0], *shape), self.prefixes[s]]
            )
            for s in used
        ]
        table = torch.cat([padded[0].new_zeros(1, width, *shape), torch.stack(padded)])
        where = {s: i + 1 for i, s in enumerate(used)}
        rows = table[torch.tensor([where.get(s, 0) for s in slots], device=table.device)]
        lengths = torch.tensor([0 if s is None else self.prefixes[s].shape[0] for s in slots])
        return rows, (torch.arange(width)[None, :] >= width - lengths[:, None]).long()

    @classmethod
    def initialise(
        cls,
        base: FrozenBase,
        cultures: list[str],
        num_virtual_tokens: int,
        init: str = "persona",
        seed: int = 0,
        kind: str = "input",
        shared_prefix: torch.Tensor | None = None,
    ) -> SoftPromptBank:
        """A new bank: each expert's `kind` part of `num_virtual_tokens` tokens, from its persona text or random.

        `input`: input prompts (persona: the text's token embeddings); `deep`: prefixes (persona: the keys and
        values the model caches for the text, so the untrained expert answers as the persona prompt would).
        `shared_prefix`: a prefix every expert without its own shares (input experts on it: composed experts).
        """
        if init not in ("persona", "random"):
            raise ValueError(f"unknown prompt init {init!r}; use 'persona', 'random' or copy_expert()")
        if kind not in ("input", "deep"):
            raise ValueError(f"unknown prompt kind {kind!r}; use 'input' or 'deep'")
        embed = base.model.get_input_embeddings()
        width = embed.weight.shape[1]
        generator = torch.Generator().manual_seed(seed)
        prompts, prefixes = [], []
        for culture in cultures:
            ids = base.tokenizer(persona_text(culture), add_special_tokens=False)["input_ids"]
            if kind == "deep":
                prompts.append(torch.zeros(0, width))
                if init == "persona":
                    prefixes.append(text_prefix(base.model, ids, num_virtual_tokens))
                else:
                    persona = text_prefix(base.model, ids, len(ids))
                    prefixes.append(random_prefix(persona, num_virtual_tokens, generator))
            elif init == "persona":
                # Like PEFT's TEXT init: repeat the persona's tokens until they fill L.
                # The embedding module's output, not its weight rows: Gemma scales rows by sqrt(hidden) there.
                ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
                prompts.append(embed(torch.tensor(ids, device=base.device)).detach().float().cpu())
            else:
                noise = torch.randn(num_virtual_tokens, width, generator=generator)
                prompts.append(noise * float(embed.weight.float().std()) * _output_scale(embed, ids))
        return cls(cultures, prompts, prefixes or None, shared_prefix).to(base.device)

    def copy_expert(self, source: str, culture: str) -> SoftPromptBank:
        """A bank with one more expert, initialised as a copy of `source`'s parts (a shared prefix stays shared)."""
        i = self.index(source)
        prompts, own = list(self.prompts), self.own_prefixes()
        shared = self.shared_prefix
        bank = SoftPromptBank(self.cultures + [culture], prompts + [prompts[i]], own + [own[i]], shared)
        if shared is not None:
            bank.shared_prefix.requires_grad_(shared.requires_grad)
        return bank

    def expert(self, index: int, meta: ExpertMeta) -> Expert:
        """Expert `index`'s parts, detached on the CPU, with `meta` (its shape fields set from the parts)."""
        prefix = self.prefix(index)
        expert = Expert(
            self.prompts[index].detach().cpu().clone(),
            meta,
            None if prefix is None else prefix.detach().cpu().clone(),
        )
        return replace(expert, meta=described(expert))


def _output_scale(embed: nn.Module, ids: list[int]) -> float:
    """How much the embedding module scales its weight rows (1 for a plain nn.Embedding; sqrt(hidden) for Gemma)."""
    rows = torch.tensor(ids, device=embed.weight.device)
    return float(embed(rows).float().norm() / embed.weight[rows].float().norm())


def prompted_inputs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    bank: PromptRows | None,
    expert_idx: torch.Tensor | None,
) -> dict[str, torch.Tensor | DynamicCache]:
    """Model kwargs in which every row gets its own expert's prefix and input prompt (or none) before its tokens.

    A row is [prefix slots | input-prompt slots | tokens]. The prefix is no input: it is the KV cache the
    forward pass starts from (under the model's cache kwarg, only when a row has one; gradients reach the
    prefix Parameters through it), and the attention mask covers its slots. Padding (shorter prefixes and
    prompts, NO_EXPERT rows, left-padded tokens) is masked, and positions count only attended slots, so a
    row's first token sits at its real prefix length + input-prompt length, as with PEFT, and its result
    depends on neither its padding nor its neighbours.
    """
    embeds = model.get_input_embeddings()(input_ids)
    rows = input_ids.shape[0]
    prefix = None
    if bank is None or expert_idx is None:
        prompts = embeds.new_zeros(rows, 0, embeds.shape[-1])
        prompt_mask = attention_mask.new_zeros(rows, 0)
    else:
        prompts = bank.rows(expert_idx.cpu()).to(embeds.device, embeds.dtype)
        prompt_mask = bank.prompt_mask(expert_idx.cpu()).to(attention_mask.device, attention_mask.dtype)
        prefix = bank.prefix_rows(expert_idx.cpu())
    extra: dict[str, DynamicCache] = {}
    prefix_mask = attention_mask.new_zeros(rows, 0)
    if prefix is not None:
        kv, prefix_mask = prefix
        extra[cache_kwarg(model)] = prefix_cache(
            model, kv.to(embeds.device, embeds.dtype), bank.trained_layers
        )
        prefix_mask = prefix_mask.to(attention_mask.device, attention_mask.dtype)
    mask = torch.cat([prefix_mask, prompt_mask, attention_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "inputs_embeds": torch.cat([prompts, embeds], dim=1),
        "attention_mask": mask,
        "position_ids": positions[:, prefix_mask.shape[1] :],
    } | extra


def bank_from_experts(experts: list[Expert], device: torch.device | str = "cpu") -> SoftPromptBank:
    """One bank holding the given experts, in order (their kinds and lengths may differ)."""
    return SoftPromptBank(
        [e.meta.culture for e in experts], [e.prompt for e in experts], [e.prefix for e in experts]
    ).to(device)
