"""A training's bank of experts, on both paths (Tune trials and `shores train --local`): where it starts and
how its best is saved.

`initial_bank` is the bank a training starts from (the shared prior's parts, a persona text, or random);
`prior_train_config` is the prior's own training settings; `save_experts` writes a bank's best experts
as files (safetensors + PEFT adapter), each with its `training_summary`. Reading experts and the registry is
`workers.expert_store`; publishing a set of them for serving is `orchestrator.publish`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestrator.config import ExperimentConfig
from orchestrator.survey import data_fingerprint
from workers.base_model import FrozenBase
from workers.cultures import slug
from workers.expert_file import Expert, ExpertMeta, save_expert
from workers.peft_export import PeftExportError, export_peft_adapter
from workers.prompts import SoftPromptBank, persona_text
from workers.settings import TrainConfig
from workers.trainer import TrainResult

if TYPE_CHECKING:
    from orchestrator.survey import ExperimentData


def initial_bank(
    base: FrozenBase, cultures: list[str], config: ExperimentConfig, prior: Expert | None
) -> SoftPromptBank:
    """The bank training starts from: each expert a copy of the prior's parts (`init: shared`; a search over
    lengths cuts or cycles them), else from its persona text or random."""
    tokens = config.prompt.num_virtual_tokens
    if prior is None:
        return SoftPromptBank.initialise(base, cultures, tokens, config.prompt.init, kind=config.prompt.kind)
    prompt, prefix = prior.prompt, prior.prefix
    prompts = [fit_length(prompt, tokens if prefix is None else 0)] * len(cultures)
    prefixes = [None if prefix is None else fit_length(prefix, tokens)] * len(cultures)
    return SoftPromptBank(cultures, prompts, prefixes).to(base.device)


def fit_length(part: torch.Tensor, length: int) -> torch.Tensor:
    """An input prompt or prefix cut or cycled to `length` virtual tokens (a search over lengths starts each
    from one prior)."""
    return part[torch.arange(length) % max(part.shape[0], 1)]


def prior_train_config(config: ExperimentConfig) -> TrainConfig:
    """The shared prior's training settings: `shared.train` over `train`."""
    return config.shared.train.over(config.train)


def training_summary(result: TrainResult, config: ExperimentConfig) -> dict[str, dict]:
    """Per culture, what goes into its expert's metadata."""
    return {
        c: {
            "val_alignment": result.best_val_alignment.get(c),
            "initial_val_alignment": result.initial_val_alignment.get(c),
            "best_epoch": result.best_epoch.get(c),
            "epochs_run": result.epochs_run,
            "lr": config.train.lr,
            "num_virtual_tokens": config.prompt.num_virtual_tokens,
            "prompt_kind": config.prompt.kind,
            "experiment": config.name,
        }
        for c in result.best_epoch
    }


def save_experts(
    directory: Path, bank: SoftPromptBank, base: FrozenBase, data: ExperimentData, summaries: dict[str, dict]
) -> list[Path]:
    """Write every expert of a bank (safetensors + PEFT adapter)."""
    paths = []
    for i, culture in enumerate(bank.cultures):
        iso = next((r.iso for r in data.records if r.culture == culture), "")  # the prior has none
        meta = ExpertMeta(
            culture=culture,
            iso=iso,
            num_virtual_tokens=bank.num_virtual_tokens,
            hidden_size=base.hidden_size,
            base_model=base.name,
            base_fingerprint=base.fingerprint,
            # What its validation alignment was measured on, so that champions are compared like with like.
            training=summaries.get(culture, {}) | {"data": data_fingerprint(data, culture).to_dict()},
            descriptor=persona_text(culture),
        )
        expert = bank.expert(i, meta)  # its parts, and their shapes in the metadata
        paths.append(save_expert(directory / f"{slug(culture)}.safetensors", expert))
        try:
            export_peft_adapter(expert, base.model, directory / "peft" / slug(culture))
        except PeftExportError:
            pass  # a composed expert (prefix + input tokens) has no single PEFT form; its safetensors stand
    return paths
