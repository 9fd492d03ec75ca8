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
    batch_log_probs,
    mean_alignment,
    option_token_ids,
)
from workers.settings import TrainConfig  # also imported from here: the trainer's settings


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
OptimizerFactory = Callable[[SoftPromptBank, TrainConfig], torch.optim.Optimizer]


def adamw(bank: SoftPromptBank, config: TrainConfig) -> torch.optim.Optimizer:
    """The packed trainer's optimizer: one AdamW over every expert's prompt and prefix (a frozen one aside)."""
    params = [p for p in bank.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def culture_seed(seed: int, culture: str) -> int:
    # Each expert's data order depends only on the seed and its own culture, so training it
    # packed with others or alone visits its examples in the same order.
    return seed * 1_000_003 + int(hashlib.sha256(culture.encode()).hexdigest()[:8], 16)


class PackedTrainer:
    """Trains every expert of a bank on its own culture's examples; the base model stays frozen.

    Loss = sum over experts of the mean KL(survey || model) over that expert's rows in the
    micro-batch, so each expert's gradient is exactly what training it alone would give. Experts that
    share a trainable prefix are one unit (`bank.units()`): the shared prefix learns from all their rows,
    and they are validated, kept at their best epoch and stopped together, on their mean alignment.
    With `select: group` every expert of the bank is one unit for that choice.
    """

    rank, world = 0, 1  # this process among the data-parallel workers training the bank: here, alone

    def __init__(
        self,
        base: FrozenBase,
        bank: SoftPromptBank,
        train: dict[str, list[EncodedQuestion]],
        val: dict[str, list[EncodedQuestion]],
        config: TrainConfig,
        progress: bool = False,
        optimizer: OptimizerFactory = adamw,
    ):
        missing = [c for c in bank.cultures if not train.get(c)]
        if missing:
            raise ValueError(f"no training examples for {missing}")
        self.base, self.bank, self.train, self.val, self.config = base, bank, train, val, config
        bank.trained_layers = config.prefix_layers
        self.progress = progress
        self.optimizer = optimizer(bank, config)
        self.letter_ids = option_token_ids(base.tokenizer)
        self.generators = {
            c: torch.Generator().manual_seed(culture_seed(config.seed, c)) for c in bank.cultures
        }
        self.epoch = 0
        self.active = list(bank.cultures)
        self.best_prompts = {c: bank.prompts[i].detach().clone() for i, c in enumerate(bank.cultures)}
        self.best_prefixes = self.current_prefixes()  # the cultures with a deep prefix
        self.best_val: dict[str, float] = {}
        self.best_epoch = {c: 0 for c in bank.cultures}
        self.initial_val: dict[str, float] = {}
        self.stale = {c: 0 for c in bank.cultures}
        self.history: list[EpochReport] = []
        self.grad_norms: list[float] = []  # the current epoch's, one per optimizer step

    @property
    def device(self) -> torch.device:
        """Where the forward passes run."""
        return self.base.device

    def validate(self, cultures: list[str]) -> dict[str, float]:
        """Mean validation alignment per culture with the bank's current prompts."""
        scores = {}
        for culture in cultures:
            questions = self.val.get(culture, [])
            if not questions:
                continue
            expert = self.bank.index(culture)
            scores[culture] = mean_alignment(
                self.base, self.bank, questions, expert, self.config.eval_batch_size
            )
        return scores

    def epoch_batches(self) -> list[tuple[list[EncodedQuestion], list[str]]]:
        """This epoch's micro-batches: the rows and their cultures, each active expert's next chunk in turn.

        Draws each active expert's data order from its own generator, so call it once an epoch.
        """
        size = self.config.batch_size
        orders = {
            c: length_bucketed(
                torch.randperm(len(self.train[c]), generator=self.generators[c]).tolist(),
                [len(q.input_ids) for q in self.train[c]],
                size * self.config.length_buckets,
            )
            for c in self.active
        }
        steps = max(math.ceil(len(order) / size) for order in orders.values())
        batches = []
        for step in range(steps):
            rows, cultures = [], []
            for culture, order in orders.items():
                chunk = order[step * size : (step + 1) * size]
                rows += [self.rendered(self.train[culture][i], culture) for i in chunk]
                cultures += [culture] * len(chunk)
            batches.append((rows, cultures))
        return batches

    def rendered(self, question: EncodedQuestion, culture: str) -> EncodedQuestion:
        """One of the question's renderings, drawn from its culture's generator (the question itself if it has
        none): an expert then learns what survives how a questionnaire writes the question."""
        if not question.renderings or not self.config.renderings:
            return question
        pick = int(torch.randint(len(question.renderings), (1,), generator=self.generators[culture]))
        return question.renderings[pick]

    def train_epoch(self) -> dict[str, float]:
        """One pass over every active expert's examples; returns each one's mean training loss."""
        cfg = self.config
        batches = self.epoch_batches()
        losses: dict[str, list[float]] = {c: [] for c in self.active}
        self.grad_norms = []
        used: set[str] = set()  # experts with rows since the last optimizer step
        self.zero_grad()
        bar = tqdm(batches, desc=f"epoch {self.epoch}", unit="step", disable=not self.progress, leave=False)
        for step, (rows, cultures) in enumerate(bar):
            boundary = (step + 1) % cfg.grad_accum == 0 or step + 1 == len(batches)
            step_losses = self.micro_step(rows, cultures, boundary)
            for culture, value in step_losses.items():
                losses[culture].append(value)
            bar.set_postfix(loss=f"{sum(step_losses.values()):.4f}")
            used.update(cultures)
            if boundary:
                self.grad_norms.append(
                    self.optimizer_step(idle=[c for c in self.bank.cultures if c not in used])
                )
                used = set()
        return {c: float(np.mean(v)) for c, v in losses.items()}

    def micro_step(
        self, rows: list[EncodedQuestion], cultures: list[str], boundary: bool
    ) -> dict[str, float]:
        """Forward and backward of one micro-batch (gradients accumulate); each culture's mean loss in it."""
        expert_idx = [self.bank.index(c) for c in cultures]
        log_probs = batch_log_probs(self.base, self.bank, rows, expert_idx, self.letter_ids, normalised=False)
        per_row = torch.stack([answer_loss(log_probs[i], q) for i, q in enumerate(rows)])
        (packed_loss(per_row, cultures) / self.config.grad_accum).backward()
        return culture_means(per_row.detach(), cultures)

    def optimizer_step(self, idle: list[str]) -> float:
        """Apply the accumulated gradients and clear them; returns their norm.

        `idle` experts had no rows since the last step: their gradients are None, so AdamW skips them.
        """
        grads = [torch.linalg.vector_norm(p.grad) for p in self.bank.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def current_prompts(self) -> dict[str, torch.Tensor]:
        """A copy of every expert's prompt as it is now."""
        return {c: self.bank.prompts[i].detach().clone() for i, c in enumerate(self.bank.cultures)}

    def load_prompts(self, prompts: dict[str, torch.Tensor]) -> None:
        """Set the bank's prompts (for the cultures given)."""
        with torch.no_grad():
            for culture, prompt in prompts.items():
                self.bank.prompts[self.bank.index(culture)].copy_(prompt)

    def current_prefixes(self) -> dict[str, torch.Tensor]:
        """A copy of every deep prefix as it is now, by culture (one copy of a shared one, under each of its cultures)."""
        copies: dict[int, torch.Tensor] = {}
        for slot in {s for s in self.bank.prefix_of if s is not None}:
            copies[slot] = self.bank.prefixes[slot].detach().clone()
        return {c: copies[s] for c, s in zip(self.bank.cultures, self.bank.prefix_of) if s is not None}

    def load_prefixes(self, prefixes: dict[str, torch.Tensor]) -> None:
        """Set the bank's deep prefixes (for the cultures given)."""
        with torch.no_grad():
            for culture, prefix in prefixes.items():
                self.bank.prefix(self.bank.index(culture)).copy_(prefix)

    def best_bank(self) -> SoftPromptBank:
        """A new bank of every expert at its best epoch, its prefixes tied as in the trained bank."""
        cultures, own, shared = self.bank.cultures, self.bank.own_prefixes(), self.bank.shared_prefix
        prefixes = [None if p is None else self.best_prefixes[c] for c, p in zip(cultures, own)]
        tied = [c for c, p in zip(cultures, own) if p is None and shared is not None]
        best = SoftPromptBank(
            cultures,
            [self.best_prompts[c] for c in cultures],
            prefixes,
            self.best_prefixes[tied[0]] if tied else shared,  # a tied unit shares one best epoch
        )
        if shared is not None:
            best.shared_prefix.requires_grad_(shared.requires_grad)
        return best

    def selection_units(self) -> list[list[str]]:
        """The experts that keep one epoch and stop together, chosen on their mean validation alignment."""
        return [list(self.bank.cultures)] if self.config.select == "group" else self.bank.units()

    def fit(self, callback: Callback | None = None) -> TrainResult:
        """Train until every expert has run its epochs or stopped early; the bank ends with the best prompts."""
        if not self.initial_val:
            self.initial_val = self.validate(self.bank.cultures)
            self.best_val = dict(self.initial_val)
        while self.epoch < self.config.epochs and self.active:
            self.epoch += 1
            train_loss = self.train_epoch()
            val = self.validate(self.active)
            current, prefixes = self.current_prompts(), self.current_prefixes()
            for unit in self.selection_units():
                unit = [c for c in unit if c in self.active]
                scored = [c for c in unit if c in val]
                # With no validation data there is nothing to select on: the latest prompt is kept.
                better = not scored or np.mean([val[c] for c in scored]) > np.mean(
                    [self.best_val.get(c, -1.0) for c in scored]
                )
                for culture in unit:
                    if better:
                        self.best_val[culture] = val.get(culture, float("nan"))
                        self.best_epoch[culture], self.stale[culture] = self.epoch, 0
                        self.best_prompts[culture] = current[culture]
                        if culture in prefixes:
                            self.best_prefixes[culture] = prefixes[culture]
                    else:
                        self.stale[culture] += 1
            report = EpochReport(self.epoch, train_loss, val, dict(self.best_val), list(self.active))
            self.active = [c for c in self.active if self.stale[c] < self.config.patience]
            self.history.append(report)
            if callback is not None:
                callback(report, self)
        self.load_prompts(self.best_prompts)
        self.load_prefixes(self.best_prefixes)
        return self.result()

    def result(self) -> TrainResult:
        """Where training stands: per culture the best validation alignment and its epoch."""
        return TrainResult(
            dict(self.best_val), dict(self.best_epoch), dict(self.initial_val), self.epoch, self.history
        )

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly: prompts, optimizer, data order, early stopping."""
        return {
            "bank": self.bank_state(),
            "optimizer": self.optimizer_state(),
            "generators": {c: g.get_state() for c, g in self.generators.items()},
            "epoch": self.epoch,
            "active": self.active,
            "best_prompts": self.best_prompts,
            "best_prefixes": self.best_prefixes,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "initial_val": self.initial_val,
            "stale": self.stale,
        }

    def bank_state(self) -> dict:
        return self.bank.state_dict()

    def load_bank_state(self, state: dict) -> None:
        self.bank.load_state_dict(state)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`."""
        self.load_bank_state(state["bank"])
        self.load_optimizer_state(state["optimizer"])
        for culture, generator_state in state["generators"].items():
            self.generators[culture].set_state(generator_state)
        self.epoch, self.active = state["epoch"], list(state["active"])
        self.best_prompts, self.best_val = state["best_prompts"], state["best_val"]
        self.best_prefixes = state.get("best_prefixes", {})  # none in a checkpoint from before deep prompts
        self.best_epoch, self.initial_val, self.stale = (
            state["best_epoch"],
            state["initial_val"],
            state["stale"],
        )


def length_bucketed(order: list[int], lengths: list[int], bucket: int) -> list[int]:
    """A shuffled order whose every run of `bucket` rows is sorted by length: batches cut from it pad little,
    and every expert's batches go from short to long in step, so packed steps pad little too."""
    runs = [order[i : i + bucket] for i in range(0, len(order), bucket)]
    return [i for run in runs for i in sorted(run, key=lambda i: lengths[i])]


def answer_loss(log_probs: torch.Tensor, question: EncodedQuestion) -> torch.Tensor:
    """KL(survey || model) over one question's options, less the log of the model's mass on the options: the
    survey's answers' cross-entropy under the next token, less the survey's entropy.

    `log_probs` are the options' log-probabilities in the whole next-token distribution
    (`option_log_probs(normalised=False)`), so an answer that opens with other words than an option letter (a
    chat's "Sure! ...") costs what a wrong option costs. Normalised log-probabilities give the KL alone.
    """
    target = torch.tensor(question.target, dtype=torch.float32, device=log_probs.device)
    model = log_probs[: question.n_options]
    mass = torch.logsumexp(model, dim=0)
    nz = target > 0
    return torch.sum(target[nz] * (target[nz].log() - (model[nz] - mass))) - mass


def packed_loss(
    per_row: torch.Tensor, cultures: list[str], counts: dict[str, int] | None = None
) -> torch.Tensor:
    """Sum over experts of the mean loss of each expert's rows: what training each alone would minimise.

    `counts` are the number of rows of each culture in the whole micro-batch, for a shard of it
    (data-parallel workers): each worker's losses then add up to the whole micro-batch's.
    """
    names = np.array(cultures)
    total = per_row.new_zeros(())
    for culture in dict.fromkeys(cultures):
        mine = per_row[torch.from_numpy(names == culture)]
        total = total + (mine.mean() if counts is None else mine.sum() / counts[culture])
    return total


def culture_means(per_row: torch.Tensor, cultures: list[str]) -> dict[str, float]:
    """Each culture's mean of a per-row value."""
    names = np.array(cultures)
    return {c: float(per_row[torch.from_numpy(names == c)].mean()) for c in dict.fromkeys(cultures)}
