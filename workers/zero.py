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

import difflib
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from workers.base_model import FrozenBase
from workers.prompts import NO_EXPERT, SoftPromptBank
from workers.scoring import EncodedQuestion, alignment, batch_log_probs
from workers.trainer import PackedTrainer, TrainConfig, kl_to_survey, packed_loss

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# The prompt bank's AdamW is passed in: a DeepSpeed-built optimizer (which would JIT-compile fused Adam)
# or scheduler would train something else than the packed trainer does.
FORBIDDEN_KEYS = {
    "optimizer": "the prompt bank's AdamW is passed to DeepSpeed; set train.lr and train.weight_decay",
    "scheduler": "the learning rate is constant (train.lr), as in packed training",
}
HALF = {"bfloat16": "bf16", "float16": "fp16"}


class DeepSpeedSettings(Protocol):
    """What `ds_config` reads: the `deepspeed` section of an experiment config."""

    num_workers: int
    zero_stage: int
    config: dict


def ensure_extensions_dir() -> None:
    """Cache DeepSpeed's JIT-compiled ops (the CPU shared-memory comm op: ~25 s) inside the environment."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def ds_config(section: DeepSpeedSettings, batch_rows: int, grad_accum: int, dtype: str = "float32") -> dict:
    """The DeepSpeed config of one trial, validated: ours, with the section's extra keys merged over it.

    `batch_rows` is the rows of one micro-batch over all workers (experts x train.batch_size); each
    worker takes its share of them. Batch sizes and the ZeRO stage come from the experiment config:
    extra keys may repeat them but not contradict them.
    """
    world = section.num_workers
    micro = max(1, math.ceil(batch_rows / world))
    ours = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world,
        "zero_optimization": {"stage": section.zero_stage},
        "steps_per_print": sys.maxsize,  # progress is reported per epoch, not logged per step
    }
    if dtype in HALF:  # DeepSpeed trains a half-precision module with fp32 master weights
        ours[HALF[dtype]] = {"enabled": True}
    extra = dict(section.config or {})
    for key, why in FORBIDDEN_KEYS.items():
        if key in extra:
            raise ValueError(f"deepspeed.config.{key}: not allowed: {why}")
    zero = extra.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero and zero["stage"] != section.zero_stage:
        raise ValueError(
            f"deepspeed.config.zero_optimization.stage ({zero['stage']!r}) contradicts "
            f"deepspeed.zero_stage ({section.zero_stage}); set deepspeed.zero_stage only"
        )
    config = _merge(ours, extra)
    validate_ds_config(config, world)
    for key, source in zip(BATCH_KEYS, ("train.batch_size", "train.batch_size", "train.grad_accum")):
        if config[key] != ours[key]:
            raise ValueError(
                f"deepspeed.config.{key} ({config[key]}) contradicts {source}: with {world} workers it is "
                f"{ours[key]}; batch sizes come from the train section"
            )
    return config


def validate_ds_config(config: dict, world_size: int = 1, prefix: str = "deepspeed.config") -> dict:
    """Check a DeepSpeed config as DeepSpeed would, with no process group; a ValueError names the bad setting.

    DeepSpeed's own check (`DeepSpeedConfig`) rejects bad values and unknown keys inside its sections; a
    top-level key it never reads is rejected here. Batch sizes must multiply out over `world_size`.
    """
    ensure_extensions_dir()
    from deepspeed.runtime.config import DeepSpeedConfig

    if not isinstance(config, dict):
        raise ValueError(f"{prefix}: must be a mapping, got {type(config).__name__}")
    known = _known_keys(DeepSpeedConfig)
    for key in config:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"{prefix}.{key}: not a DeepSpeed setting{hint}")
    local = dict(config)  # the same config as one worker's share of the world: DeepSpeed checks it at size 1
    if "train_batch_size" in config and all(k in config for k in BATCH_KEYS):
        total, micro, accum = (config[k] for k in BATCH_KEYS)
        if not all(isinstance(v, int) and v > 0 for v in (total, micro, accum)):
            bad = next(
                k for k, v in zip(BATCH_KEYS, (total, micro, accum)) if not (isinstance(v, int) and v > 0)
            )
            raise ValueError(f"{prefix}.{bad}: must be a positive integer, got {config[bad]!r}")
        if total != micro * accum * world_size:
            raise ValueError(
                f"{prefix}: batch sizes do not multiply out: train_batch_size {total} != "
                f"train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {accum} x {world_size} workers"
            )
        local["train_batch_size"] = micro * accum
    elif isinstance(config.get("train_batch_size"), int) and world_size > 1:
        if config["train_batch_size"] % world_size:
            raise ValueError(
                f"{prefix}.train_batch_size: {config['train_batch_size']} is not a multiple of {world_size} workers"
            )
        local["train_batch_size"] = config["train_batch_size"] // world_size
    problem = _ds_problem(DeepSpeedConfig, local)
    if problem is None:
        return config
    # Name the setting: the first key that is wrong on its own, else the config as a whole.
    batch = {k: local[k] for k in BATCH_KEYS if k in local}
    for key in local:
        if key in BATCH_KEYS:
            continue
        alone = _ds_problem(DeepSpeedConfig, batch | {key: local[key]})
        if alone is not None:
            where, message = alone
            raise ValueError(f"{prefix}.{'.'.join([str(key), *where])}: {message}")
    where, message = problem
    raise ValueError(f"{'.'.join([prefix, *where])}: {message}")


def _ds_problem(config_class, config: dict) -> tuple[list[str], str] | None:
    """None if DeepSpeed accepts the config, else (where inside the section, one line saying what)."""
    try:
        config_class(dict(config))
    except Exception as err:  # DeepSpeed raises pydantic, assertion, type and value errors alike
        errors = getattr(err, "errors", None)
        if callable(errors):
            first = errors()[0]
            return [str(p) for p in first.get("loc", ())], first.get("msg", str(err))
        text = str(err).strip().splitlines()
        return [], (text[0] if text else type(err).__name__)
    return None


_KNOWN: set[str] | None = None


def _known_keys(config_class) -> set[str]:
    """Every top-level key DeepSpeed looks up while reading a config (recorded once, on a minimal config)."""
    global _KNOWN
    if _KNOWN is None:
        seen: set[str] = set()

        class Keys(set):
            def __contains__(self, key):
                seen.add(key)
                return super().__contains__(key)

        class Recorder(dict):
            def __getitem__(self, key):
                seen.add(key)
                return super().__getitem__(key)

            def get(self, key, *default):
                seen.add(key)
                return super().get(key, *default)

            def __contains__(self, key):
                seen.add(key)
                return super().__contains__(key)

            def keys(self):
                return Keys(super().keys())

        config_class(Recorder(train_batch_size=1))
        _KNOWN = seen
    return _KNOWN


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, merging nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _EveryExpert:
    """Stands in for the bank in `prompted_inputs`: each row's prompt indexed out of the whole bank.

    Every expert is then in every backward graph (a zero gradient when it has no rows), the same graph
    on every worker, so DeepSpeed reduces the same gradients everywhere.
    """

    def __init__(self, bank: SoftPromptBank):
        self.bank = bank

    def rows(self, expert_idx: torch.Tensor) -> torch.Tensor:
        if bool((expert_idx == NO_EXPERT).any()):
            raise ValueError("every row of a ZeRO batch needs an expert")
        weight = self.bank.weight
        return weight[expert_idx.to(weight.device)]


class PromptedModel(nn.Module):
    """The frozen base and the prompt bank as one module: forward gives each row's option log-probabilities."""

    def __init__(self, base: FrozenBase, bank: SoftPromptBank):
        super().__init__()
        self.model, self.bank = base.model, bank
        self.frozen = base  # not a module: the same model, with its tokenizer

    def forward(
        self, rows: list[EncodedQuestion], expert_idx: list[int], letter_ids: torch.Tensor
    ) -> torch.Tensor:
        return batch_log_probs(self.frozen, _EveryExpert(self.bank), rows, expert_idx, letter_ids)


class ZeroTrainer(PackedTrainer):
    """PackedTrainer on DeepSpeed: the same training, data-parallel over the process group's workers.

    Needs torch.distributed initialised (Ray Train does it); every worker constructs it with the same
    arguments and calls the same methods in the same order (most of them are collective). Under ZeRO-3
    the base model's parameters become this worker's shards in place: give each trainer its own
    `FrozenBase` (SharedBase.materialise); the shared arrays themselves are only read.
    """

    def __init__(
        self,
        base: FrozenBase,
        bank: SoftPromptBank,
        train: dict[str, list[EncodedQuestion]],
        val: dict[str, list[EncodedQuestion]],
        config: TrainConfig,
        ds: dict,
    ):
        ensure_extensions_dir()
        import deepspeed
        import deepspeed.comm as dist

        super().__init__(base, bank, train, val, config)
        deepspeed.init_distributed(verbose=False)  # adopts the process group that is already there
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        model = PromptedModel(base, bank)
        if self.stage == 3:
            # Partition the parameters where they are, one at a time, before the engine sees them:
            # a base that does not fit one device is never moved there whole.
            deepspeed.zero.Init(module=model, config_dict_or_path=ds)
        # One parameter group per expert, so that an expert with nothing to learn from can be skipped.
        groups = [{"params": [p], "expert": c} for c, p in zip(bank.cultures, bank.prompts)]
        self.client_optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.client_optimizer.register_step_pre_hook(self._skip_idle)
        self.idle: set[str] = set()
        self.steps = {c: 0 for c in bank.cultures}  # optimizer steps each expert has taken
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.client_optimizer, config=ds
        )
        self.engine.eval()  # the frozen base stays in eval mode (no dropout), as single-process

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
        per_row = torch.stack([kl_to_survey(log_probs[i], q) for i, q in enumerate(local_rows)])
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
            log_probs = self.engine(
                [q for _, q in batch], [self.bank.index(c) for c, _ in batch], self.letter_ids
            )
            for row, (culture, question) in enumerate(chunk):
                probs = log_probs[row, : question.n_options].exp().cpu().double().numpy()
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


def build_zero_trainer(
    base: FrozenBase,
    cultures: list[str],
    train: dict[str, list[EncodedQuestion]],
    val: dict[str, list[EncodedQuestion]],
    config: TrainConfig,
    ds: dict,
    num_virtual_tokens: int,
    init: str = "persona",
) -> ZeroTrainer:
    """A ZeroTrainer with a new bank, initialised the same way on every worker."""
    bank = SoftPromptBank.initialise(base, cultures, num_virtual_tokens, init)
    return ZeroTrainer(base, bank, train, val, config, ds)


def base_max_change(trainer: ZeroTrainer, reference: dict[str, np.ndarray]) -> float:
    """The largest absolute change of any frozen base weight from `reference` (e.g. SharedBase.tensors).

    Gathers every shard: every worker takes part. For checks, not for training.
    """
    import deepspeed

    worst = 0.0
    for name, p in trainer.base.model.named_parameters():
        if name not in reference:
            continue
        with deepspeed.zero.GatheredParameters([p]):
            worst = max(
                worst,
                float((p.detach().cpu().float() - torch.from_numpy(reference[name]).float()).abs().max()),
            )
    return worst
