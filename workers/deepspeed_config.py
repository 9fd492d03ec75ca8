"""The DeepSpeed config of a ZeRO trial: built from the experiment's settings and checked before any worker starts.

DeepSpeed is imported only to check a config: its own config class checks values and unknown keys with no
process group.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from pathlib import Path
from typing import Protocol

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
        # DeepSpeed clips gradients at norm 1 unless told; one process (PackedTrainer) does not clip at all.
        "gradient_clipping": 0.0,
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
