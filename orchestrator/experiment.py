"""The plain (Ray-free) training path: records -> encoded examples -> experts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from orchestrator.calibration import calibrate_winners
from orchestrator.config import ExperimentConfig
from orchestrator.encoding import encoded
from orchestrator.experts import save_experts
from orchestrator.publish import publish_experts
from orchestrator.results import Winner
from orchestrator.survey import ExperimentData, prepare_data
from workers.base_model import FrozenBase, load_frozen_base
from workers.cultures import SHARED
from workers.expert_file import Expert, load_expert
from workers.prompts import SoftPromptBank
from workers.settings import TrainConfig
from workers.trainer import EpochReport, PackedTrainer, TrainResult


def print_epoch(report: EpochReport, trainer: PackedTrainer) -> None:
    """One line per culture and epoch: training loss, validation alignment, best so far."""
    for culture in report.train_loss:
        val = report.val_alignment.get(culture, float("nan"))
        print(
            f"epoch {report.epoch:>2}  {culture:<24} loss {report.train_loss[culture]:.4f}  "
            f"val alignment {val:.4f}  best {report.best_val_alignment.get(culture, float('nan')):.4f}",
            flush=True,
        )


def train_local(config: ExperimentConfig, replace: bool = False) -> list[str]:
    """Train every selected culture's expert in this process (the shared prior first, with `init: shared`),
    then publish them as training under Tune does; return the cultures published."""
    data = prepare_data(config.data, shared=config.shared)
    print(f"data: {data.report.summary()}", flush=True)
    base = load_frozen_base(config.base_model.name, config.base_model.dtype, config.base_model.device)
    winners: dict[str, Winner] = {}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".local-", dir=out) as folder:
        staging = Path(folder)
        prior = None
        if config.prompt.init == SHARED:  # the prior trains alone first, from its culture-blind persona
            persona = config.prompt.model_copy(update={"init": "persona"})
            stage = config.model_copy(update={"prompt": persona, "train": prior_train_config(config)})
            winners |= _fit_local(stage, base, data, [SHARED], staging, None)
            prior = load_expert(winners[SHARED].expert_file)
        cultures = data.selection.trained if prior is not None else data.experts
        winners |= _fit_local(config, base, data, cultures, staging, prior)
        calibrate_winners(config, data, winners, lambda: base)
        publish_experts(config.experts_dir, winners, data, replace=replace)
    return sorted(winners)


def _fit_local(
    config: ExperimentConfig,
    base: FrozenBase,
    data: ExperimentData,
    cultures: list[str],
    folder: Path,
    prior: Expert | None,
) -> dict[str, Winner]:
    """Train one packed bank of `cultures` and save its best experts into `folder`; each culture's winner."""
    train, val = (encoded(base, data, split, cultures, config.data.max_length) for split in ("train", "val"))
    print(
        f"training {len(cultures)} experts on {base.name} ({sum(map(len, train.values()))} train, "
        f"{sum(map(len, val.values()))} val questions)",
        flush=True,
    )
    bank = initial_bank(base, cultures, config, prior)
    trainer = PackedTrainer(base, bank, train, val, config.train, progress=True)
    result = trainer.fit(print_epoch)
    save_experts(folder, trainer.best_bank(), base, data, training_summary(result, config))
    return {
        c: Winner(c, "local", folder, float(result.best_val_alignment.get(c) or float("-inf")))
        for c in cultures
    }


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
