"""The packed trainer: K cultural experts trained at once, every batch mixing rows of several cultures."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from workers.base_model import FrozenBase
from workers.prompts import SoftPromptBank
from workers.scoring import (
    EncodedQuestion,
    alignment,
    batch_log_probs,
    option_distributions,
    option_token_ids,
)


@dataclass
class TrainConfig:
    """Optimisation settings of one packed training run."""

    epochs: int = 4
    batch_size: int = 4  # rows of each expert in one micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without a better validation alignment before an expert stops
    seed: int = 0
    eval_batch_size: int = 16


@dataclass
class EpochReport:
    """What one epoch produced, per culture; handed to the reporting callback."""

    epoch: int
    train_loss: dict[str, float]
    val_alignment: dict[str, float]
    best_val_alignment: dict[str, float]
    active: list[str]

    def metrics(self) -> dict[str, float]:
        """Flat metrics: per-culture values and their means."""
        flat = {"epoch": self.epoch}
        for name, values in (("train_loss", self.train_loss), ("val_alignment", self.val_alignment)):
            flat |= {f"{name}/{c}": v for c, v in values.items()}
            if values:
                flat[name] = float(np.mean(list(values.values())))
        flat["best_val_alignment"] = float(np.mean(list(self.best_val_alignment.values())))
        return flat


@dataclass
class TrainResult:
    """Per culture: the best validation alignment, the epoch it came from, and the one before training."""

    best_val_alignment: dict[str, float]
    best_epoch: dict[str, int]
    initial_val_alignment: dict[str, float]
    epochs_run: int
    history: list[EpochReport] = field(default_factory=list)


Callback = Callable[[EpochReport, "PackedTrainer"], None]


def culture_seed(seed: int, culture: str) -> int:
    # Each expert's data order depends only on the seed and its own culture, so training it
    # packed with others or alone visits its examples in the same order.
    return seed * 1_000_003 + int(hashlib.sha256(culture.encode()).hexdigest()[:8], 16)


class PackedTrainer:
    """Trains every expert of a bank on its own culture's examples; the base model stays frozen.

    Loss = sum over experts of the mean KL(survey || model) over that expert's rows in the
    micro-batch, so each expert's gradient is exactly what training it alone would give.
    """

    def __init__(
        self,
        base: FrozenBase,
        bank: SoftPromptBank,
        train: dict[str, list[EncodedQuestion]],
        val: dict[str, list[EncodedQuestion]],
        config: TrainConfig,
        progress: bool = False,
    ):
        missing = [c for c in bank.cultures if not train.get(c)]
        if missing:
            raise ValueError(f"no training examples for {missing}")
        self.base, self.bank, self.train, self.val, self.config = base, bank, train, val, config
        self.progress = progress
        self.optimizer = torch.optim.AdamW(bank.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.letter_ids = option_token_ids(base.tokenizer)
        self.generators = {
            c: torch.Generator().manual_seed(culture_seed(config.seed, c)) for c in bank.cultures
        }
        self.epoch = 0
        self.active = list(bank.cultures)
        self.best_prompts = {c: bank.prompts[i].detach().clone() for i, c in enumerate(bank.cultures)}
        self.best_val: dict[str, float] = {}
        self.best_epoch = {c: 0 for c in bank.cultures}
        self.initial_val: dict[str, float] = {}
        self.stale = {c: 0 for c in bank.cultures}
        self.history: list[EpochReport] = []

    def validate(self, cultures: list[str]) -> dict[str, float]:
        """Mean validation alignment per culture with the bank's current prompts."""
        scores = {}
        for culture in cultures:
            questions = self.val.get(culture, [])
            if not questions:
                continue
            idx = [self.bank.index(culture)] * len(questions)
            dists = option_distributions(self.base, self.bank, questions, idx, self.config.eval_batch_size)
            scores[culture] = float(np.mean([alignment(d, q.target) for d, q in zip(dists, questions)]))
        return scores

    def train_epoch(self) -> dict[str, float]:
        """One pass over every active expert's examples; returns each one's mean training loss."""
        cfg = self.config
        orders = {
            c: torch.randperm(len(self.train[c]), generator=self.generators[c]).tolist() for c in self.active
        }
        steps = max(math.ceil(len(order) / cfg.batch_size) for order in orders.values())
        losses: dict[str, list[float]] = {c: [] for c in self.active}
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(
            range(steps), desc=f"epoch {self.epoch}", unit="step", disable=not self.progress, leave=False
        )
        for step in bar:
            rows, cultures = [], []
            for culture, order in orders.items():
                chunk = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                rows += [self.train[culture][i] for i in chunk]
                cultures += [culture] * len(chunk)
            expert_idx = [self.bank.index(c) for c in cultures]
            log_probs = batch_log_probs(self.base, self.bank, rows, expert_idx, self.letter_ids)
            per_row = torch.stack([kl_to_survey(log_probs[i], q) for i, q in enumerate(rows)])
            names = np.array(cultures)
            loss = sum(per_row[torch.from_numpy(names == c)].mean() for c in dict.fromkeys(cultures))
            (loss / cfg.grad_accum).backward()
            for culture in dict.fromkeys(cultures):
                losses[culture].append(float(per_row.detach()[torch.from_numpy(names == culture)].mean()))
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if (step + 1) % cfg.grad_accum == 0 or step + 1 == steps:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {c: float(np.mean(v)) for c, v in losses.items()}

    def fit(self, callback: Callback | None = None) -> TrainResult:
        """Train until every expert has run its epochs or stopped early; the bank ends with the best prompts."""
        if not self.initial_val:
            self.initial_val = self.validate(self.bank.cultures)
            self.best_val = dict(self.initial_val)
        while self.epoch < self.config.epochs and self.active:
            self.epoch += 1
            train_loss = self.train_epoch()
            val = self.validate(self.active)
            for culture in self.active:
                # With no validation data there is nothing to select on: the latest prompt is kept.
                if culture not in val or val[culture] > self.best_val.get(culture, -1.0):
                    self.best_val[culture] = val.get(culture, float("nan"))
                    self.best_epoch[culture], self.stale[culture] = self.epoch, 0
                    self.best_prompts[culture] = self.bank.prompts[self.bank.index(culture)].detach().clone()
                else:
                    self.stale[culture] += 1
            report = EpochReport(self.epoch, train_loss, val, dict(self.best_val), list(self.active))
            self.active = [c for c in self.active if self.stale[c] < self.config.patience]
            self.history.append(report)
            if callback is not None:
                callback(report, self)
        with torch.no_grad():
            for i, culture in enumerate(self.bank.cultures):
                self.bank.prompts[i].copy_(self.best_prompts[culture])
        return self.result()

    def result(self) -> TrainResult:
        """Where training stands: per culture the best validation alignment and its epoch."""
        return TrainResult(
            dict(self.best_val), dict(self.best_epoch), dict(self.initial_val), self.epoch, self.history
        )

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly: prompts, optimizer, data order, early stopping."""
        return {
            "bank": self.bank.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generators": {c: g.get_state() for c, g in self.generators.items()},
            "epoch": self.epoch,
            "active": self.active,
            "best_prompts": self.best_prompts,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "initial_val": self.initial_val,
            "stale": self.stale,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`."""
        self.bank.load_state_dict(state["bank"])
        self.optimizer.load_state_dict(state["optimizer"])
        for culture, generator_state in state["generators"].items():
            self.generators[culture].set_state(generator_state)
        self.epoch, self.active = state["epoch"], list(state["active"])
        self.best_prompts, self.best_val = state["best_prompts"], state["best_val"]
        self.best_epoch, self.initial_val, self.stale = (
            state["best_epoch"],
            state["initial_val"],
            state["stale"],
        )


def kl_to_survey(log_probs: torch.Tensor, question: EncodedQuestion) -> torch.Tensor:
    """KL(survey || model) over one question's options."""
    target = torch.tensor(question.target, dtype=torch.float32, device=log_probs.device)
    model = log_probs[: question.n_options]
    nz = target > 0
    return torch.sum(target[nz] * (target[nz].log() - model[nz]))
