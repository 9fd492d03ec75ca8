"""The plain (Ray-free) training path, and the encoding every path shares: records -> encoded examples -> experts."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import ExperimentConfig
from orchestrator.experts import save_experts
from orchestrator.survey import ExperimentData, SurveyRecord, prepare_data
from workers.base_model import FrozenBase, load_frozen_base
from workers.prompts import SoftPromptBank, persona_text
from workers.scoring import EncodedQuestion, encode_question
from workers.trainer import EpochReport, PackedTrainer, TrainResult


def encode(
    base: FrozenBase, records: list[SurveyRecord], max_length: int, persona: bool = False
) -> list[EncodedQuestion]:
    """Records as model-ready questions, optionally under the culture's hard-text persona."""
    return [
        encode_question(
            base.tokenizer,
            r.question,
            r.options,
            r.distribution,
            persona_text(r.culture) if persona else None,
            max_length,
        )
        for r in records
    ]


def encoded(
    base: FrozenBase, data: ExperimentData, split: str, cultures: list[str], max_length: int
) -> dict[str, list[EncodedQuestion]]:
    """Per culture, its records in a split as model-ready questions: what a trainer trains or selects on."""
    return {c: encode(base, r, max_length) for c, r in data.records_of(split, cultures).items()}


def print_epoch(report: EpochReport, trainer: PackedTrainer) -> None:
    """One line per culture and epoch: training loss, validation alignment, best so far."""
    for culture in report.train_loss:
        val = report.val_alignment.get(culture, float("nan"))
        print(
            f"epoch {report.epoch:>2}  {culture:<24} loss {report.train_loss[culture]:.4f}  "
            f"val alignment {val:.4f}  best {report.best_val_alignment.get(culture, float('nan')):.4f}",
            flush=True,
        )


def train_local(config: ExperimentConfig) -> list[Path]:
    """Train every selected culture's expert in one packed run in this process; return the saved experts."""
    data = prepare_data(config.data, shared=config.shared)
    print(f"data: {data.report.summary()}", flush=True)
    cultures = data.experts
    base = load_frozen_base(config.base_model.name, config.base_model.dtype, config.base_model.device)
    train, val = (encoded(base, data, split, cultures, config.data.max_length) for split in ("train", "val"))
    print(
        f"training {len(cultures)} experts on {base.name} ({sum(map(len, train.values()))} train, "
        f"{sum(map(len, val.values()))} val questions)",
        flush=True,
    )
    bank = SoftPromptBank.initialise(
        base, cultures, config.prompt.num_virtual_tokens, config.prompt.init, kind=config.prompt.kind
    )
    result = PackedTrainer(base, bank, train, val, config.train, progress=True).fit(print_epoch)
    return save_experts(config.experts_dir, bank, base, data, training_summary(result, config))


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
