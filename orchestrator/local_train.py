"""The plain (Ray-free) training path, `shores train --local`: records -> encoded examples -> experts.

One process trains every culture (the shared prior first, with `init: shared`), calibrates and publishes them
as the Tune path does; the bank it starts from and how it is saved are `orchestrator.expert_bank`'s, shared
with the Tune trials.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from orchestrator.calibration import calibrate_winners
from orchestrator.config import ExperimentConfig
from orchestrator.encoding import encoded
from orchestrator.expert_bank import initial_bank, prior_train_config, save_experts, training_summary
from orchestrator.publish import publish_experts
from orchestrator.results import Winner
from orchestrator.survey import ExperimentData, prepare_data
from workers.base_model import FrozenBase, load_frozen_base
from workers.cultures import SHARED
from workers.expert_file import Expert, load_expert
from workers.trainer import EpochReport, PackedTrainer


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
