"""Attention per layer kind: full attention, and sliding windows counted in real tokens, not cache columns.

transformers draws a sliding window over cache columns. In a left-padded batch a row's padding, and the
prompt slots it leaves empty beside a neighbour with a longer prompt, would then use up its window, and its
answer would depend on its neighbours. Here a window counts a row's real slots only: a query at position p
(the real slots before it) sees the real slots at positions p - window + 1 .. p, as the model sees a row alone.

Every cache layer keeps every slot (`unwindowed_cache`); the masks apply the windows. A model without
sliding-window layers keeps the 2D padding mask that transformers expands itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class LayerKinds:
    """The attention kinds of a model's layers."""

    kinds: tuple[str, ...]  # one a layer
    window: int | None  # the sliding layers' window in tokens; None when no layer slides

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Whether each layer slides."""
        return tuple(kind == SLIDING for kind in self.kinds)

    @property
    def mixed(self) -> bool:
        """Both full and sliding layers: the model takes one mask per kind."""
        return FULL in self.kinds and SLIDING in self.kinds


def layer_kinds(config: PretrainedConfig) -> LayerKinds:
    """Each layer's attention kind, read as transformers reads it to build the model's cache."""
    kinds, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    windows = {k.get("sliding_window") for kind, k in zip(kinds, kwargs) if kind == SLIDING}
    if len(windows) > 1:
        raise ValueError(f"sliding layers of different windows {sorted(windows)} are not supported")
    return LayerKinds(tuple(kinds), windows.pop() if windows else None)


def check_layer_kinds(config: PretrainedConfig) -> None:
    """Refuse a model with layers other than full or sliding-window attention (chunked, linear, shared KV)."""
    other = sorted(set(layer_kinds(config).kinds) - {FULL, SLIDING})
    if other:
        raise ValueError(f"full and sliding-window attention only; this model has {', '.join(other)} layers")


def unwindowed_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty cache of the model's layers, each keeping every slot (its window is the masks' business)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [DynamicLayer() for _ in cache.layers]
    return cache


def forward_mask(
    model: PreTrainedModel,
    mask: torch.Tensor,
    queries: int,
    sliding_slots: int | None = None,
    kinds: LayerKinds | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The `attention_mask` for a forward pass whose inputs are the last `queries` columns of `mask`.

    `mask` is B x S, 1 on real slots (cache and inputs). For a model with sliding layers: a B x 1 x Q x S
    mask in the format of its attention implementation, or one a layer kind when it mixes kinds. Padding
    queries see themselves, so no row of the softmax is empty. `sliding_slots`: the sliding layers hold
    only the last slots of their rows (the queries included); their mask keeps those columns. `kinds`: the
    model's `layer_kinds`, read once by a caller that runs many forwards (reading them costs ~0.4 ms).
    """
    kinds = kinds or layer_kinds(model.config)
    window = kinds.window
    if window is None:
        return mask
    real = mask.bool()
    positions = real.long().cumsum(-1)
    columns = torch.arange(mask.shape[1], device=mask.device)
    query_columns = columns[-queries:]
    causal = columns[None, :] <= query_columns[:, None]
    seen = real[:, None, :] & causal[None]
    seen |= (columns[None, :] == query_columns[:, None])[None] & ~real[:, -queries:, None]
    near = seen & (positions[:, -queries:, None] - positions[:, None, :] < window)
    if sliding_slots is not None:
        near = near[..., -sliding_slots:]
    if not kinds.mixed:
        return _as_attention_mask(model, near)
    return {FULL: _as_attention_mask(model, seen), SLIDING: _as_attention_mask(model, near)}


def _as_attention_mask(model: PreTrainedModel, allowed: torch.Tensor) -> torch.Tensor:
    """B x Q x S booleans as the model's attention implementation takes a 4D mask."""
    implementation = model.config._attn_implementation
    if implementation == "sdpa":
        return allowed[:, None]
    if implementation == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]
    raise ValueError(f"sliding-window models need attention 'sdpa' or 'eager' here, not {implementation!r}")


def windowed(model: PreTrainedModel, inputs: dict) -> dict:
    """Model kwargs (`workers.prompts.prompted_inputs`) with their 2D mask as `forward_mask` makes it."""
    queries = inputs["inputs_embeds"].shape[1]
    return inputs | {"attention_mask": forward_mask(model, inputs["attention_mask"], queries)}
