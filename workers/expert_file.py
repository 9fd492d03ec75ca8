"""The expert file: one culture's soft prompt as safetensors, its metadata in the header.

A file holds the input prompt (`prompt`, L_i x D) and, for a deep expert, its prefix (`prefix`); the header
says whose it is and which base model it was trained for, so loading refuses a base it does not fit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.base_model import FrozenBase
from workers.prefix import kv_shape

FORMAT_VERSION = "2"  # 2: an optional deep prefix (version 1 files load as input-only)


class PromptMismatchError(ValueError):
    """A soft prompt that does not fit the base model it is loaded onto."""


@dataclass
class ExpertMeta:
    """What travels with a soft prompt: whose it is, which base model it was trained for, its parts' shapes."""

    culture: str
    iso: str
    num_virtual_tokens: int  # the input prompt's tokens, L_i (0: a deep-only expert)
    hidden_size: int
    base_model: str
    base_fingerprint: str
    training: dict = field(default_factory=dict)  # summary: val alignment, epochs, lr, trial, ...
    descriptor: str = ""  # text the router embeds to match free-text profiles
    # The deep prefix: its tokens, L_p (0: none, as in every file from before deep prompts), and the cache
    # shape it was made for, checked against the base on load.
    prefix_tokens: int = 0
    num_layers: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    # The shared prior's share in this expert's answers, (1 - w) expert + w prior, fitted at training
    # (`shared.expert_prior_weight`); 0: the expert alone.
    prior_weight: float = 0.0

    @property
    def kind(self) -> str:
        """`input` (prompt tuning), `deep` (prefix tuning) or `composed` (a prefix and input tokens)."""
        if not self.prefix_tokens:
            return "input"
        return "composed" if self.num_virtual_tokens else "deep"

    def to_strings(self) -> dict[str, str]:
        values = asdict(self) | {"format_version": FORMAT_VERSION, "kind": self.kind}
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
            prior_weight=float(values.get("prior_weight", 0.0)),
            **{
                k: int(values.get(k, 0))
                for k in ("prefix_tokens", "num_layers", "num_key_value_heads", "head_dim")
            },
        )


@dataclass
class Expert:
    """One culture's trained soft prompt: its input prompt (L_i x D), its deep prefix if it has one, its metadata."""

    prompt: torch.Tensor
    meta: ExpertMeta
    prefix: torch.Tensor | None = None  # L_p x num_layers x 2 (key, value) x num_key_value_heads x head_dim


def described(expert: Expert) -> ExpertMeta:
    """The expert's metadata with its shape fields read off its tensors, so a header always describes its file."""
    shapes = dict(num_virtual_tokens=expert.prompt.shape[0], hidden_size=expert.prompt.shape[1])
    tokens, layers, kv_heads, head_dim = 0, 0, 0, 0
    if expert.prefix is not None:
        tokens, layers, _, kv_heads, head_dim = expert.prefix.shape
    return replace(
        expert.meta,
        **shapes,
        prefix_tokens=tokens,
        num_layers=layers,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


def save_expert(path: Path, expert: Expert) -> Path:
    """Write one expert as safetensors (its input prompt, its prefix if any), its metadata in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {"prompt": expert.prompt.detach().float().cpu().contiguous()}
    if expert.prefix is not None:
        tensors["prefix"] = expert.prefix.detach().float().cpu().contiguous()
    save_file(tensors, tmp, described(expert).to_strings())
    tmp.replace(path)  # atomic: a crash never leaves a half-written expert under its real name
    return path


def load_expert(path: Path, base: FrozenBase | None = None) -> Expert:
    """Read one expert; refuse it if it was trained for another base model than `base`.

    A file from before deep prompts has no prefix: it loads as an input-only expert.
    """
    with safe_open(str(path), framework="pt") as handle:
        meta = ExpertMeta.from_strings(handle.metadata() or {})
        prompt = handle.get_tensor("prompt")
        prefix = handle.get_tensor("prefix") if "prefix" in handle.keys() else None
    if base is not None and meta.base_fingerprint != base.fingerprint:
        raise PromptMismatchError(
            f"expert {meta.culture!r} ({path}) was trained for base model {meta.base_model!r} "
            f"(fingerprint {meta.base_fingerprint}), not {base.name!r} (fingerprint {base.fingerprint})"
        )
    if base is not None and meta.hidden_size != base.hidden_size:
        raise PromptMismatchError(
            f"expert {meta.culture!r} has width {meta.hidden_size}, model {base.hidden_size}"
        )
    if base is not None and prefix is not None:
        names = ("num_layers", "num_key_value_heads", "head_dim")
        have = dict(zip(names, (prefix.shape[1], prefix.shape[3], prefix.shape[4])))
        for name, want in zip(names, kv_shape(base.model.config)):
            if have[name] != want:
                raise PromptMismatchError(
                    f"expert {meta.culture!r} has a deep prefix for {name}={have[name]}, model has {want}"
                )
    return Expert(prompt=prompt, meta=meta, prefix=prefix)
