"""The soft-prompt bank: one trainable prompt per culture, prepended row by row to a frozen model's input."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from workers.base_model import FrozenBase
from workers.settings import SHARED

NO_EXPERT = -1  # the expert index of a row that gets no prompt (the plain base model)
FORMAT_VERSION = "1"


class PromptMismatchError(ValueError):
    """A soft prompt that does not fit the base model it is loaded onto."""


def persona_text(culture: str) -> str:
    """The hard-text persona naming a culture: the paper's own approach, and the default prompt init."""
    if culture == SHARED:  # the culture-blind prior starts from a persona of no culture in particular
        return (
            "You are a person answering a survey. Answer the way most people around the world would answer."
        )
    return f"You are a person from {culture}. Answer the way most people in {culture} would answer."


@dataclass
class ExpertMeta:
    """What travels with a soft prompt: whose it is and which base model it was trained for."""

    culture: str
    iso: str
    num_virtual_tokens: int
    hidden_size: int
    base_model: str
    base_fingerprint: str
    training: dict = field(default_factory=dict)  # summary: val alignment, epochs, lr, trial, ...
    descriptor: str = ""  # text the router embeds to match free-text profiles

    def to_strings(self) -> dict[str, str]:
        values = asdict(self) | {"format_version": FORMAT_VERSION}
        return {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in values.items()}

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> ExpertMeta:
        return cls(
            culture=values["culture"],
            iso=values["iso"],
            num_virtual_tokens=int(values["num_virtual_tokens"]),
            hidden_size=int(values["hidden_size"]),
            base_model=values["base_model"],
            base_fingerprint=values["base_fingerprint"],
            training=json.loads(values.get("training", "{}")),
            descriptor=values.get("descriptor", ""),
        )


@dataclass
class Expert:
    """One culture's trained soft prompt (L x D) and its metadata."""

    prompt: torch.Tensor
    meta: ExpertMeta


class SoftPromptBank(nn.Module):
    """E experts, each L_e virtual tokens x D, one prompt per culture; L_e may differ between experts.

    Each expert is its own Parameter so that an expert with no rows in a step gets no gradient
    (None, not zeros) and AdamW leaves it and its moments untouched: packed training of K experts
    is then exactly K separate trainings. `weight` gives a bank of one length as one E x L x D tensor.
    """

    def __init__(self, cultures: list[str], prompts: torch.Tensor | Sequence[torch.Tensor]):
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
        self.cultures = list(cultures)
        self.prompts = nn.ParameterList(nn.Parameter(p.detach().clone().float()) for p in prompts)

    @property
    def weight(self) -> torch.Tensor:
        if len(set(self.lengths)) > 1:
            raise ValueError(f"experts of different prompt lengths {sorted(set(self.lengths))} do not stack")
        return torch.stack(list(self.prompts))

    @property
    def lengths(self) -> list[int]:
        """Each expert's number of virtual tokens, in bank order."""
        return [p.shape[0] for p in self.prompts]

    @property
    def num_virtual_tokens(self) -> int:
        """The prompt slots a row gets: the longest expert's length (every expert's, in a bank of one length)."""
        return max(self.lengths)

    def index(self, culture: str) -> int:
        return self.cultures.index(culture)

    def rows(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """The B x L x D prompts of a batch, touching only the experts used.

        L is the longest prompt in the bank; a shorter prompt fills the last slots, zeros before it (and
        zeros throughout where NO_EXPERT); `prompt_mask` says which slots are real.
        """
        width, first = self.num_virtual_tokens, self.prompts[0]
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
        slots = torch.arange(self.num_virtual_tokens)
        return (slots[None, :] >= self.num_virtual_tokens - lengths[:, None]).long()

    @classmethod
    def initialise(
        cls,
        base: FrozenBase,
        cultures: list[str],
        num_virtual_tokens: int,
        init: str = "persona",
        seed: int = 0,
    ) -> SoftPromptBank:
        """A new bank: each prompt from its persona text's embeddings (default) or random."""
        embeddings = base.model.get_input_embeddings().weight.detach().float().cpu()
        generator = torch.Generator().manual_seed(seed)
        prompts = []
        for culture in cultures:
            if init == "persona":
                ids = base.tokenizer(persona_text(culture), add_special_tokens=False)["input_ids"]
                # Like PEFT's TEXT init: repeat the persona's tokens until they fill L.
                ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
                prompts.append(embeddings[torch.tensor(ids)])
            elif init == "random":
                noise = torch.randn(num_virtual_tokens, embeddings.shape[1], generator=generator)
                prompts.append(noise * embeddings.std())
            else:
                raise ValueError(f"unknown prompt init {init!r}; use 'persona', 'random' or copy_expert()")
        return cls(cultures, torch.stack(prompts)).to(base.device)

    def copy_expert(self, source: str, culture: str) -> SoftPromptBank:
        """A bank with one more expert, initialised as a copy of `source`."""
        extra = self.prompts[self.index(source)].detach().unsqueeze(0)
        return SoftPromptBank(self.cultures + [culture], torch.cat([self.weight.detach(), extra]))


def prompted_inputs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    bank: SoftPromptBank | None,
    expert_idx: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Model kwargs in which every row gets its own expert's prompt (or none) before its tokens.

    The prompt occupies the first L slots of every row (the longest prompt's length; a shorter prompt's
    padding and NO_EXPERT rows are masked out); positions count only attended slots, so a row's result
    does not depend on its padding, its neighbours or their prompt lengths.
    """
    embeds = model.get_input_embeddings()(input_ids)
    if bank is None or expert_idx is None:
        prompts = embeds.new_zeros(input_ids.shape[0], 0, embeds.shape[-1])
        prompt_mask = attention_mask.new_zeros(input_ids.shape[0], 0)
    else:
        prompts = bank.rows(expert_idx.cpu()).to(embeds.device, embeds.dtype)
        if isinstance(bank, SoftPromptBank):
            prompt_mask = bank.prompt_mask(expert_idx.cpu()).to(attention_mask.device, attention_mask.dtype)
        else:  # a stand-in (the ZeRO trainer's) whose prompts all have one length
            has_prompt = (expert_idx != NO_EXPERT).to(attention_mask.device, attention_mask.dtype)
            prompt_mask = has_prompt[:, None].expand(-1, prompts.shape[1])
    mask = torch.cat([prompt_mask, attention_mask], dim=1)
    return {
        "inputs_embeds": torch.cat([prompts, embeds], dim=1),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def save_expert(path: Path, expert: Expert) -> Path:
    """Write one expert as safetensors, its metadata in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"prompt": expert.prompt.detach().float().cpu().contiguous()}, tmp, expert.meta.to_strings())
    tmp.replace(path)  # atomic: a crash never leaves a half-written expert under its real name
    return path


def load_expert(path: Path, base: FrozenBase | None = None) -> Expert:
    """Read one expert; refuse it if it was trained for another base model than `base`."""
    with safe_open(str(path), framework="pt") as handle:
        meta = ExpertMeta.from_strings(handle.metadata() or {})
        prompt = handle.get_tensor("prompt")
    if base is not None and meta.base_fingerprint != base.fingerprint:
        raise PromptMismatchError(
            f"expert {meta.culture!r} ({path}) was trained for base model {meta.base_model!r} "
            f"(fingerprint {meta.base_fingerprint}), not {base.name!r} (fingerprint {base.fingerprint})"
        )
    if base is not None and meta.hidden_size != base.hidden_size:
        raise PromptMismatchError(
            f"expert {meta.culture!r} has width {meta.hidden_size}, model {base.hidden_size}"
        )
    return Expert(prompt=prompt, meta=meta)


def bank_from_experts(experts: list[Expert], device: torch.device | str = "cpu") -> SoftPromptBank:
    """One bank holding the given experts, in order (their prompt lengths may differ)."""
    return SoftPromptBank([e.meta.culture for e in experts], [e.prompt for e in experts]).to(device)


def export_peft_adapter(expert: Expert, model: PreTrainedModel, out_dir: Path) -> Path:
    """Write an expert as a PEFT prompt-tuning adapter that `PeftModel.from_pretrained` loads."""
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=expert.meta.num_virtual_tokens,
        token_dim=expert.meta.hidden_size,
        num_transformer_submodules=1,
        num_attention_heads=model.config.num_attention_heads,
        num_layers=model.config.num_hidden_layers,
        base_model_name_or_path=expert.meta.base_model,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(
        {"prompt_embeddings": expert.prompt.detach().float().cpu().contiguous()},
        out_dir / "adapter_model.safetensors",
    )
    return out_dir
