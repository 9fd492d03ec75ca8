"""The engine's KV cache alone: merging rows of different widths, keeping rows, truncating, slot accounting."""

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.attention import FULL, SLIDING, LayerKinds
from workers.engine.kv_cache import (
    DEFAULT_CACHE_TOKENS,
    SPARE_SLOTS,
    RunningCache,
    SpareSlotsLayer,
    auto_cache_tokens,
    merge,
    row_indices,
    slot_bytes,
    truncate,
    with_spare_slots,
)
from workers.prefix import cache_kwarg

LAYERS, HEADS, DIM = 2, 1, 3


@dataclass(eq=False)
class Request:
    rows: int


def cache_of(values: torch.Tensor) -> DynamicCache:
    """A cache whose every layer's keys (and values, negated) are `values`: rows x width, one per slot."""
    cache = DynamicCache()
    states = values[:, None, :, None].expand(-1, HEADS, -1, DIM).float()
    for layer in range(LAYERS):
        cache.update(states.clone(), -states.clone(), layer)
    return cache


def slots(cache: DynamicCache, layer: int = 0) -> list[list[float]]:
    """Each row's slot values back from a layer's keys."""
    return cache.layers[layer].keys[:, 0, :, 0].tolist()


def test_a_merge_left_pads_the_narrower_side_and_stacks_the_new_rows_below():
    old, old_mask = cache_of(torch.tensor([[1, 2, 3], [4, 5, 6]])), torch.tensor([[1, 1, 1], [0, 1, 1]])
    new, new_mask = cache_of(torch.tensor([[7, 8, 9, 10, 11]])), torch.ones(1, 5, dtype=torch.long)
    merged, mask = merge(old, old_mask, new, new_mask)
    assert merged is old  # the running cache, its layers given the new tensors
    for layer in range(LAYERS):
        assert slots(merged, layer) == [[0, 0, 1, 2, 3], [0, 0, 4, 5, 6], [7, 8, 9, 10, 11]]
        assert torch.equal(merged.layers[layer].values, -merged.layers[layer].keys)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    # The new side narrower: it is the one padded.
    merged, mask = merge(
        cache_of(torch.tensor([[1, 2, 3]])), torch.ones(1, 3), cache_of(torch.tensor([[4]])), torch.ones(1, 1)
    )
    assert slots(merged) == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_merge_into_no_cache_is_the_new_cache():
    new, mask = cache_of(torch.tensor([[1, 2]])), torch.ones(1, 2)
    assert merge(None, None, new, mask) == (new, mask)


def test_row_indices_follow_each_requests_rows_in_order():
    requests = [Request(2), Request(1), Request(3)]
    assert row_indices(requests, [requests[0], requests[2]], torch.device("cpu")).tolist() == [0, 1, 3, 4, 5]
    assert row_indices(requests, [requests[1]], torch.device("cpu")).tolist() == [2]


def test_keeping_rows_cuts_the_others_and_the_padding_no_kept_row_attends_to():
    requests = [Request(1), Request(2)]
    running = RunningCache()
    running.add(
        cache_of(torch.tensor([[1, 2, 3, 4], [0, 0, 5, 6], [0, 0, 0, 7]])),
        torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]),
    )
    cache, mask = running.kept(requests, [requests[1]])
    assert slots(cache) == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]  # two columns of padding go
    assert slots(running.cache)[2] == [0, 0, 0, 7] and running.mask.shape == (
        3,
        4,
    )  # unchanged until assigned
    copy, copy_mask = running.rows_of(requests, [requests[0]])
    assert slots(copy) == [[1, 2, 3, 4]] and copy_mask.tolist() == [[1, 1, 1, 1]]


def test_truncate_undoes_a_forward_that_grew_some_layers():
    cache = cache_of(torch.tensor([[1, 2, 3]]))
    cache.layers[0].keys = torch.cat([cache.layers[0].keys, cache.layers[0].keys[..., :1, :]], dim=-2)
    truncate(cache, [3, 3])
    assert [layer.keys.shape[-2] for layer in cache.layers] == [3, 3] and slots(cache) == [[1, 2, 3]]


def test_slot_accounting_counts_held_needed_and_peak_slots():
    running = RunningCache()
    assert running.slots == (0, 0) and running.used == 0
    running.add(cache_of(torch.tensor([[1, 2, 3], [0, 0, 4]])), torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert running.slots == (6, 4) and running.used == 6
    running.count(torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    running.count(torch.tensor([[1, 1]]))
    assert (running.slot_steps_used, running.slot_steps_needed, running.peak_cache_slots) == (10, 8, 8)
    running.clear()
    assert running.cache is None and running.slots == (0, 0)


def test_spare_slots_layers_append_in_place_and_copy_only_when_full():
    cache = with_spare_slots(cache_of(torch.tensor([[1, 2]])))
    layer = cache.layers[0]
    assert all(type(layer) is SpareSlotsLayer for layer in cache.layers)
    step = torch.full((1, HEADS, 1, DIM), 9.0)
    layer.update(step, -step)
    buffer = layer._buffers[0]
    assert buffer.shape[-2] == 3 + SPARE_SLOTS and slots(cache) == [[1, 2, 9]]
    for _ in range(SPARE_SLOTS):
        layer.update(step, -step)
    assert layer._buffers[0] is buffer and layer.keys.shape[-2] == 3 + SPARE_SLOTS  # no copy while slots last
    layer.update(step, -step)
    assert layer._buffers[0] is not buffer and torch.equal(layer.values, -layer.keys)
    assert type(with_spare_slots(DynamicCache()).layers) is list  # no layers yet: nothing to change
    assert issubclass(SpareSlotsLayer, DynamicLayer)


def test_slot_bytes_is_one_rows_slot_of_a_real_cache_and_a_cpu_budget_is_the_default(tiny_base):
    cache = DynamicCache(config=tiny_base.model.config)
    with torch.no_grad():
        tiny_base.model(
            input_ids=torch.tensor([[1]]), use_cache=True, **{cache_kwarg(tiny_base.model): cache}
        )
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert slot_bytes(tiny_base) == held
    assert auto_cache_tokens(tiny_base, 0.5) == DEFAULT_CACHE_TOKENS


def test_sliding_layers_forget_the_slots_out_of_every_rows_window_and_still_merge_and_keep():
    window = 4
    width = SPARE_SLOTS + 10
    # Row 0: all real; row 1: padding, then 6 real slots. Layer 0 slides, layer 1 attends to everything.
    mask = torch.ones(2, width, dtype=torch.long)
    mask[1, : width - 6] = 0
    values = torch.arange(1, 2 * width + 1).reshape(2, width) * mask
    running = RunningCache(LayerKinds((SLIDING, FULL), window))
    running.add(cache_of(values), mask)
    running.forget_out_of_window()
    # The next token of row 0 sits at position `width`: it sees positions width-3.. only, so the sliding layer
    # keeps its last window-1 slots. Row 1's 6 real slots: its first 3 are out of its window too.
    assert running.widths == [window - 1, width]
    assert slots(running.cache, 0) == values[:, -(window - 1) :].tolist()
    # A newcomer wider than the sliding layer pads that layer to its own width, the full layer to the mask's.
    newcomer = torch.arange(100, 105)[None]
    running.add(cache_of(newcomer), torch.ones(1, 5, dtype=torch.long))
    assert running.widths == [5, width] and running.mask.shape == (3, width)
    assert slots(running.cache, 0)[2] == newcomer[0].tolist()
    assert slots(running.cache, 0)[0] == [0, 0] + values[0, -(window - 1) :].tolist()
    # Keeping rows cuts the full layer's leading padding and the sliding layer only where it reaches.
    requests = [Request(1), Request(1), Request(1)]
    cache, kept_mask = running.kept(requests, requests[1:])
    assert kept_mask.shape == (2, 6) and [layer.keys.shape[-2] for layer in cache.layers] == [5, 6]
    assert slots(cache, 0) == [[0, 0] + values[1, -(window - 1) :].tolist(), newcomer[0].tolist()]


def test_sliding_layers_keep_every_slot_until_enough_are_out_of_window():
    mask = torch.ones(1, SPARE_SLOTS + 2, dtype=torch.long)
    running = RunningCache(LayerKinds((SLIDING, SLIDING), 4))
    running.add(cache_of(torch.arange(SPARE_SLOTS + 2)[None]), mask)
    running.forget_out_of_window()  # 31 slots out of window: fewer than SPARE_SLOTS, so no copy yet
    assert running.widths == [SPARE_SLOTS + 2] * 2
    RunningCache().forget_out_of_window()  # no window, no cache: nothing to do
