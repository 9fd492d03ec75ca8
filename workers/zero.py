"""ZeRO training of the prompt bank: the frozen base sharded over data-parallel workers by DeepSpeed.

Each worker (a Ray Train worker, with torch.distributed set up) builds the frozen base from the shared
checkpoint, wraps it with the soft-prompt bank in one module, and hands both to `deepspeed.initialize`
with an AdamW over the bank only. Under ZeRO-3 every worker holds a shard of the base and gathers each
layer for its forward and backward. `ZeroTrainer` is `PackedTrainer` with the micro-step, the optimizer
step, validation and the trainer state done data-parallel; with the same data and config it ends with
the same prompts as the single-process trainer:

- every micro-batch is the one PackedTrainer builds (same per-culture data order), its rows dealt out
  to the workers; each worker's loss is its rows' share of the packed loss (each expert's mean taken
  over the whole micro-batch), times the number of workers, because DeepSpeed averages gradients over
  them: the averaged gradient is then exactly the single-process one;
- each expert has its own AdamW parameter group, and an expert with no rows since the last step is
  skipped by the optimizer, as it is single-process (where its gradient is None);
- validation is split over the workers and summed, so every worker takes the same early-stopping
  decisions.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn

from workers.base_model import FrozenBase
from workers.deepspeed_config import ensure_extensions_dir
from workers.prompts import NO_EXPERT, SoftPromptBank
from workers.scoring import EncodedQuestion, alignment, batch_log_probs, order_averaged
from workers.trainer import PackedTrainer, TrainConfig, answer_loss, packed_loss


class EveryExpertRows:
    """The bank's prompts for a ZeRO forward pass (a `PromptRows`): each row's prompt indexed out of the whole bank.

    Every expert is then in every backward graph (a zero gradient when it has no rows), the same graph
    on every worker, so DeepSpeed reduces the same gradients everywhere.
    """

    trained_layers = None  # input prompts only: no prefix layers to choose among

    def __init__(self, bank: SoftPromptBank):
        self.bank = bank

    def rows(self, expert_idx: torch.Tensor) -> torch.Tensor:
        if bool((expert_idx == NO_EXPERT).any()):
            raise ValueError("every row of a ZeRO batch needs an expert")
        weight = self.bank.weight
        return weight[expert_idx.to(weight.device)]

    def prompt_mask(self, expert_idx: torch.Tensor) -> torch.Tensor:
        return self.bank.prompt_mask(expert_idx)  # prompts of one length: every slot of every row

    def prefix_rows(self, expert_idx: torch.Tensor) -> None:
        return None  # ZeroTrainer takes input prompts only


class PromptedModel(nn.Module):
    """The frozen base and the prompt bank as one module: forward gives each row's options' log-probabilities."""

    def __init__(self, base: FrozenBase, bank: SoftPromptBank):
        super().__init__()
        self.model, self.bank = base.model, bank
        self.frozen = base  # not a module: the same model, with its tokenizer

    def forward(
        self, rows: list[EncodedQuestion], expert_idx: list[int], letter_ids: torch.Tensor
    ) -> torch.Tensor:
        # The options' log-probabilities in the whole next-token distribution (`answer_loss`).
        return batch_log_probs(
            self.frozen, EveryExpertRows(self.bank), rows, expert_idx, letter_ids, normalised=False
        )


def adamw_per_expert(bank: SoftPromptBank, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one parameter group per expert, so that an expert with nothing to learn from can be skipped."""
    groups = [{"params": [p], "expert": c} for c, p in zip(bank.cultures, bank.prompts)]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


class ZeroTrainer(PackedTrainer):
    """PackedTrainer on DeepSpeed: the same training, data-parallel over the process group's workers.

    Needs torch.distributed initialised (Ray Train does it); every worker constructs it with the same
    arguments and calls the same methods in the same order (most of them are collective). Under ZeRO-3
    the base model's parameters become this worker's shards in place: give each trainer its own
    `FrozenBase` (SharedBase.materialise); the shared arrays themselves are only read.
    """

    def __init__(self, base: FrozenBase, bank: SoftPromptBank, *args: Any, ds: dict, **kwargs: Any):
        """PackedTrainer's arguments (its optimizer aside: one AdamW group per expert) and the DeepSpeed config."""
        if bank.prefixes:
            # EveryExpertRows gives input prompts only; the deep path is single-process (PackedTrainer).
            raise ValueError("ZeRO training takes input prompts only: train deep experts with PackedTrainer")
        ensure_extensions_dir()
        import deepspeed
        import deepspeed.comm as dist

        super().__init__(base, bank, *args, optimizer=adamw_per_expert, **kwargs)
        deepspeed.init_distributed(verbose=False)  # adopts the process group that is already there
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        model = PromptedModel(base, bank)
        if self.stage == 3:
            # Partition the parameters where they are, one at a time, before the engine sees them:
            # a base that does not fit one device is never moved there whole.
            deepspeed.zero.Init(module=model, config_dict_or_path=ds)
        self.client_optimizer = self.optimizer  # DeepSpeed wraps it; its state stays keyed by our tensors
        self.client_optimizer.register_step_pre_hook(self._skip_idle)
        self.idle: set[str] = set()
        self.steps = {c: 0 for c in bank.cultures}  # optimizer steps each expert has taken
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.client_optimizer, config=ds
        )
        self.engine.eval()  # the frozen base stays in eval mode (no dropout), as single-process

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _skip_idle(self, optimizer, args, kwargs):
        for group in optimizer.param_groups:
            if group["expert"] in self.idle:
                for p in group["params"]:
                    p.grad = None  # AdamW leaves a parameter with no gradient and its moments untouched

    def _share(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def micro_step(
        self, rows: list[EncodedQuestion], cultures: list[str], boundary: bool
    ) -> dict[str, float]:
        counts = Counter(cultures)
        mine = self._share(len(rows))
        # A worker with no rows of this micro-batch still runs one (weighted 0): ZeRO-3 needs every
        # worker in every gather and every gradient reduction.
        take = mine or [0]
        local_rows, local_cultures = [rows[i] for i in take], [cultures[i] for i in take]
        self.engine.set_gradient_accumulation_boundary(boundary)
        log_probs = self.engine(local_rows, [self.bank.index(c) for c in local_cultures], self.letter_ids)
        per_row = torch.stack([answer_loss(log_probs[i], q) for i, q in enumerate(local_rows)])
        # DeepSpeed averages the workers' gradients: scaling by the world size makes the average the sum.
        scale = (self.world if mine else 0.0) / self.config.grad_accum
        self.engine.backward(packed_loss(per_row, local_cultures, counts) * scale, scale_wrt_gas=False)
        # Each culture's mean loss over the whole micro-batch, for the report.
        sums = torch.zeros(len(self.bank.cultures), dtype=torch.float64)
        if mine:
            for culture, value in zip(local_cultures, per_row.detach().double().cpu().tolist()):
                sums[self.bank.index(culture)] += value
        self._all_reduce(sums)
        return {c: float(sums[self.bank.index(c)]) / n for c, n in counts.items()}

    def optimizer_step(self, idle: list[str]) -> float:
        self.idle = set(idle)
        try:
            norm = None if self.stage else self._grad_norm()
            self.engine.step()
            if norm is None:
                norm = self.engine.get_global_grad_norm()
        finally:
            self.idle = set()
        for culture in self.bank.cultures:
            self.steps[culture] += culture not in idle
        return float(norm if norm is not None else float("nan"))

    def _grad_norm(self) -> float | None:
        grads = [torch.linalg.vector_norm(p.grad.float()) for p in self.bank.prompts if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @torch.no_grad()
    def validate(self, cultures: list[str]) -> dict[str, float]:
        """Mean validation alignment per culture, the questions split over the workers."""
        items = [(c, q) for c in cultures for q in self.val.get(c, [])]
        if not items:
            return {}
        mine = [items[i] for i in self._share(len(items))]
        mine.sort(key=lambda item: len(item[1].input_ids))  # less padding, as option_distributions does
        size = self.config.eval_batch_size
        rounds = math.ceil(math.ceil(len(items) / self.world) / size)  # the same on every worker
        totals = torch.zeros(2, len(self.bank.cultures), dtype=torch.float64)
        for start in range(0, rounds * size, size):
            chunk = mine[start : start + size]
            batch = chunk or items[:1]  # a worker out of questions still joins the forward pass
            # A row per question and option order, its orders on this worker, averaged as option_distributions does.
            rows = [(k, c, ids, rev) for k, (c, q) in enumerate(batch) for ids, rev in q.orders()]
            log_probs = self.engine(
                [EncodedQuestion(ids, batch[k][1].n_options) for k, _, ids, _ in rows],
                [self.bank.index(c) for _, c, _, _ in rows],
                self.letter_ids,
            )
            answers = defaultdict(list)
            for row, (k, _, _, rev) in enumerate(rows):
                probs = log_probs[row, : batch[k][1].n_options].cpu().double().exp().numpy()
                answers[k].append((probs / probs.sum(), rev))
            for k, (culture, question) in enumerate(chunk):
                probs = order_averaged([p for p, _ in answers[k]], [rev for _, rev in answers[k]])
                totals[0, self.bank.index(culture)] += alignment(probs, question.target)
                totals[1, self.bank.index(culture)] += 1
        self._all_reduce(totals)
        return {
            c: float(totals[0, i] / totals[1, i])
            for i, c in enumerate(self.bank.cultures)
            if c in cultures and totals[1, i] > 0
        }

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        import deepspeed.comm as dist

        device = self.engine.device
        moved = tensor.to(device)
        dist.all_reduce(moved)
        tensor.copy_(moved.cpu())

    def current_prompts(self) -> dict[str, torch.Tensor]:
        """Every expert's full fp32 prompt (the optimizer's master copy), the same on every worker."""
        from deepspeed.utils import safe_get_full_fp32_param

        prompts = {}
        for culture, p in zip(self.bank.cultures, self.bank.prompts):
            full = safe_get_full_fp32_param(p)  # gathers the shards: every worker takes part
            prompts[culture] = (full if full is not None else p.detach()).float().cpu().clone()
            prompts[culture] = prompts[culture].reshape(self.bank_shape)
        return prompts

    @property
    def bank_shape(self) -> tuple[int, ...]:
        return tuple(self.best_prompts[self.bank.cultures[0]].shape)

    def load_prompts(self, prompts: dict[str, torch.Tensor]) -> None:
        """Set prompts in the optimizer's master copy and in the module the forward pass reads."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for culture, value in prompts.items():
            p = self.bank.prompts[self.bank.index(culture)]
            value = value.detach().float().to(self.engine.device)
            safe_set_full_fp32_param(p, value)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # a no-op unless ZeRO-3
                with torch.no_grad():
                    p.data.copy_(value.reshape(p.data.shape).to(p.dtype))

    def bank_state(self) -> dict:
        return {f"prompts.{i}": p for i, p in enumerate(self.current_prompts().values())}

    def load_bank_state(self, state: dict) -> None:
        self.load_prompts({c: state[f"prompts.{i}"] for i, c in enumerate(self.bank.cultures)})

    def optimizer_state(self) -> dict:
        """The AdamW state gathered from the shards, in the single-process layout (one group, param i = expert i).

        A ZeroTrainer checkpoint so continues on any number of workers, or in a PackedTrainer.
        """
        state = {}
        for i, culture in enumerate(self.bank.cultures):
            if self.steps[culture]:  # an expert that never stepped has no state yet, as in torch
                moments = {key: self._full_moment(i, key) for key in ("exp_avg", "exp_avg_sq")}
                state[i] = {"step": torch.tensor(float(self.steps[culture]))} | moments
        template = torch.optim.AdamW(
            [torch.zeros(1) for _ in self.bank.cultures],
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
        )
        return {"state": state, "param_groups": template.state_dict()["param_groups"]}

    def load_optimizer_state(self, state: dict) -> None:
        """Continue from `optimizer_state()` (or a PackedTrainer's optimizer state)."""
        for i, culture in enumerate(self.bank.cultures):
            entry = state["state"].get(i, state["state"].get(str(i)))
            if entry is None:
                continue
            self.steps[culture] = int(entry["step"])
            key_tensor = self._state_key(i)
            # AdamW creates its state at its first step: here it is created with this worker's shard.
            self.client_optimizer.state[key_tensor] = {"step": torch.tensor(float(entry["step"]))} | {
                key: self._my_shard(entry[key], key_tensor) for key in ("exp_avg", "exp_avg_sq")
            }

    def _state_key(self, group: int) -> torch.Tensor:
        """The tensor AdamW keys expert `group`'s state by: its parameter, or this worker's fp32 shard of it."""
        if self.optimizer is self.client_optimizer:  # no ZeRO, full precision: AdamW holds the parameters
            return self.bank.prompts[group]
        for name in (
            "fp32_partitioned_groups_flat",
            "single_partition_of_fp32_groups",
            "fp32_groups_flat_partition",
        ):
            shards = getattr(self.optimizer, name, None)  # ZeRO-3; ZeRO-1/2; bf16 without ZeRO
            if shards is not None:
                return shards[group]
        raise RuntimeError(f"cannot find the optimizer shards of {type(self.optimizer).__name__}")

    def _full_moment(self, group: int, key: str) -> torch.Tensor:
        """One expert's AdamW moment, whole: the workers' equal shards gathered and the padding cut off."""
        import deepspeed.comm as dist

        local = self.client_optimizer.state[self._state_key(group)][key].detach()
        if self.optimizer is not self.client_optimizer:
            gathered = local.new_empty(local.numel() * self.world)
            dist.all_gather_into_tensor(gathered, local.contiguous().view(-1))
            local = gathered
        return local.reshape(-1)[: math.prod(self.bank_shape)].reshape(self.bank_shape).float().cpu().clone()

    def _my_shard(self, full: torch.Tensor, key_tensor: torch.Tensor) -> torch.Tensor:
        """This worker's shard of a whole moment (shard r holds elements r*n ... (r+1)*n - 1, zero padded)."""
        if self.optimizer is self.client_optimizer:
            return full.to(key_tensor.device, key_tensor.dtype).reshape(key_tensor.shape).clone()
        n = key_tensor.numel()
        padded = torch.zeros(n * self.world, dtype=key_tensor.dtype)
        padded[: full.numel()] = full.reshape(-1)
        return padded[self.rank * n : (self.rank + 1) * n].to(key_tensor.device).clone()
