"""The KV cache of the running batch: its rows, merges, trims and slot accounting, and the cache budget's size.

The running batch is one transformers DynamicCache and one attention mask, row r of both belonging to the
running requests in order (each request `rows` rows, one per committee member). Rows are left-padded, so rows
of different lengths stack: a merge pads the shorter side on the left (masked) and stacks the new rows under
the running ones. When requests leave, their rows are cut out, and so are the columns that no row left attends
to (the padding of rows that left). Every change makes new tensors before it assigns them: an operation that
raises (out of memory) leaves the cache as it was. A decode forward that fails is undone by truncating every
layer back to its width.

Memory: the cache is rows x padded width slots (left padding and prefix slots included); `slot_steps_used` and
`slot_steps_needed` sum, over decode steps, the slots held and the slots the rows need (their real lengths):
their ratio is the padding's cost.

Sliding-window layers (`workers.attention`) may hold fewer slots than the mask is wide: always the last ones of
each row (`forget_out_of_window`). Merges pad each layer to its own width, and cutting columns cuts a narrower
layer only where it reaches.

The layers are `SpareSlotsLayer`s (`with_spare_slots`): a decode step writes its keys and values into free
slots after the cache's end instead of copying the whole cache, and copies only every `SPARE_SLOTS` steps, or
after a merge or a trim assigned new tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.attention import LayerKinds
from workers.base_model import FrozenBase

# Free cache slots a decode layer keeps: one copy of its cache every 32 steps, not every step.
SPARE_SLOTS = 32
DEFAULT_CACHE_TOKENS = 32768  # a CPU replica's cache budget: ~1.5 GB of SmolLM2-135M float32 slots


class HasRows(Protocol):
    rows: int


class SpareSlotsLayer(DynamicLayer):
    """A DynamicLayer that appends new keys and values into spare slots instead of concatenating.

    DynamicLayer copies a layer's whole cache at every decode step (torch.cat); this one writes the step's
    keys and values in place and copies only when its slots run out, or when `keys`/`values` were replaced
    from outside (the engine merges, reorders and trims caches by assigning them). `keys` and `values` stay
    plain [batch, heads, length, dim] tensors (views), so attention sees the same numbers.
    """

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # keys and values, with free slots after them
    _views: tuple[torch.Tensor, torch.Tensor] | None = None  # the `keys` and `values` this layer last set

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        length, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        replaced = self._views is None or self._views[0] is not self.keys or self._views[1] is not self.values
        if replaced or self._buffers[0].shape[-2] < end:
            self._buffers = tuple(self._grown(t, end) for t in (self.keys, self.values))
        keys, values = self._buffers
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    @staticmethod
    def _grown(t: torch.Tensor, needed: int) -> torch.Tensor:
        buffer = t.new_empty((*t.shape[:-2], needed + SPARE_SLOTS, t.shape[-1]))
        buffer[..., : t.shape[-2], :] = t
        return buffer


def with_spare_slots(cache: DynamicCache) -> DynamicCache:
    """The same cache (any deep prefixes in it kept), its full-attention layers appending into spare slots."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = SpareSlotsLayer  # a subclass with methods only: the layer's state carries over
    return cache


def merge(
    cache: DynamicCache | None, mask: torch.Tensor | None, new_cache: DynamicCache, new_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """The running rows and the new rows as one batch: the shorter side left-padded (masked), then stacked.

    Every new tensor is made before `cache` changes: if this raises (out of memory), `cache` is as it was."""
    if cache is None:
        return new_cache, new_mask

    def pad(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    merged = []
    for old, new in zip(cache.layers, new_cache.layers):
        # Each layer to its own width: sliding layers may hold only their last slots (`forget_out_of_window`).
        width = max(old.keys.shape[-2], new.keys.shape[-2])
        merged.append(
            (
                torch.cat([pad(old.keys, -2, width), pad(new.keys, -2, width)]),
                torch.cat([pad(old.values, -2, width), pad(new.values, -2, width)]),
            )
        )
    width = max(mask.shape[1], new_mask.shape[1])
    merged_mask = torch.cat([pad(mask, 1, width), pad(new_mask, 1, width)])
    for layer, (keys, values) in zip(cache.layers, merged):
        layer.keys, layer.values = keys, values
    return cache, merged_mask


def row_indices(requests: Sequence[HasRows], part: Sequence[HasRows], device: torch.device) -> torch.Tensor:
    """The row indices of `part`'s requests in a batch of `requests` (each `rows` rows, in order)."""
    wanted = set(map(id, part))
    owners = [g for g in requests for _ in range(g.rows)]
    return torch.tensor([r for r, g in enumerate(owners) if id(g) in wanted], dtype=torch.long, device=device)


def cache_rows(
    cache: DynamicCache, rows: torch.Tensor, first: int = 0, width: int | None = None
) -> DynamicCache:
    """A new cache of `cache`'s rows `rows` from slot `first` of the mask's `width` on (new tensors: `cache`
    is unchanged). A layer holding fewer slots than `width` holds the last ones: it loses only those before
    `first`."""
    kept = copy.copy(cache)
    kept.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        skip = first if width is None else max(0, first - (width - layer.keys.shape[-2]))
        new.keys, new.values = layer.keys[rows][..., skip:, :], layer.values[rows][..., skip:, :]
        kept.layers.append(new)
    return kept


def truncate(cache: DynamicCache, widths: Sequence[int]) -> None:
    """Undo a failed forward: each layer back to its width before it (those it reached hold one slot more)."""
    for layer, width in zip(cache.layers, widths):
        layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]


class RunningCache:
    """The running batch's cache and attention mask (None while no row runs), and its slot counters."""

    def __init__(self, kinds: LayerKinds | None = None) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.kinds = kinds  # the model's layer kinds: which layers slide, and their window
        # Cache slots (rows x width) and the slots rows hold (their real lengths), summed over decode steps:
        # their ratio is the padding's cost. `peak_cache_slots`: the most slots one step held.
        self.slot_steps_used = self.slot_steps_needed = self.peak_cache_slots = 0

    @property
    def slots(self) -> tuple[int, int]:
        """The slots now (rows x padded width) and the slots its rows need (their lengths)."""
        mask = self.mask
        return (0, 0) if mask is None else (mask.numel(), int(mask.sum()))

    @property
    def used(self) -> int:
        """The slots now (rows x padded width)."""
        return 0 if self.mask is None else self.mask.numel()

    def count(self, mask: torch.Tensor) -> None:
        """Count one decode step's slots: those held (rows x width of `mask`) and those needed."""
        self.slot_steps_used += mask.numel()
        self.slot_steps_needed += int(mask.sum())
        self.peak_cache_slots = max(self.peak_cache_slots, mask.numel())

    @property
    def widths(self) -> list[int]:
        """Each layer's slots per row (sliding layers may hold fewer than the mask's width)."""
        return [layer.keys.shape[-2] for layer in self.cache.layers]

    def forget_out_of_window(self) -> None:
        """Cut the leading slots of the sliding layers that no row attends to again (padding, or out of its
        row's window for every later token), once there are SPARE_SLOTS of them: those layers then hold about
        a window per row, plus the padding between rows' real slots."""
        if self.kinds is None or self.kinds.window is None or self.mask is None:
            return
        layers = [layer for layer, slides in zip(self.cache.layers, self.kinds.sliding) if slides]
        held = layers[0].keys.shape[-2]
        positions = (self.mask.cumsum(-1) - 1)[:, -held:]
        next_position = self.mask.sum(-1, keepdim=True)
        live = self.mask[:, -held:].bool() & (positions > next_position - self.kinds.window)
        dead = int(live.any(0).long().argmax()) if live.any() else held
        if dead < SPARE_SLOTS:
            return
        for layer in layers:
            layer.keys, layer.values = layer.keys[..., dead:, :], layer.values[..., dead:, :]

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack new rows under the running ones; if this raises, nothing changed."""
        self.cache, self.mask = merge(self.cache, self.mask, cache, mask)

    def rows_of(
        self, requests: Sequence[HasRows], part: Sequence[HasRows]
    ) -> tuple[DynamicCache, torch.Tensor]:
        """A copy of the cache and mask rows of `part`, out of a batch of `requests` (in row order)."""
        rows = row_indices(requests, part, self.mask.device)
        return cache_rows(self.cache, rows), self.mask[rows]

    def kept(self, requests: Sequence[HasRows], keep: Sequence[HasRows]) -> tuple[DynamicCache, torch.Tensor]:
        """The cache and mask of `keep`'s rows only, as new tensors (the running cache is unchanged until
        they are assigned), less the columns that no row kept attends to (the padding of rows that left)."""
        rows = row_indices(requests, keep, self.mask.device)
        mask = self.mask[rows]
        first = int(mask.any(0).long().argmax())
        return cache_rows(self.cache, rows, first, mask.shape[1]), mask[:, first:]

    def clear(self) -> None:
        self.cache = self.mask = None


def slot_bytes(base: FrozenBase) -> int:
    """The bytes of one cache slot of one row: a key and a value per layer."""
    config = base.model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = next(base.model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def auto_cache_tokens(base: FrozenBase, fraction: float) -> int:
    """A cache budget that fits the replica: DEFAULT_CACHE_TOKENS on a CPU; on a GPU, the slots that `fraction`
    of its free memory holds (halved: a merge copies the cache)."""
    if base.device.type != "cuda":
        return DEFAULT_CACHE_TOKENS
    free, _ = torch.cuda.mem_get_info(base.device)
    return max(1, int(free * fraction) // (2 * slot_bytes(base)))
