"""Attention masks per layer kind: windows counted in a row's real slots, in the format the model takes."""

import pytest
import torch
from transformers import AutoConfig

from workers.attention import FULL, SLIDING, check_layer_kinds, forward_mask, layer_kinds
from workers.base_model import load_frozen_base
from workers.tiny_model import TINY_WINDOW, save_tiny_model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {
        f: load_frozen_base(str(save_tiny_model(f, root / f)), device="cpu")
        for f in ("llama", "mistral", "gemma2")
    }


def test_a_full_attention_model_keeps_the_2d_padding_mask(bases):
    mask = torch.tensor([[0, 1, 1]])
    assert forward_mask(bases["llama"].model, mask, 2) is mask
    assert layer_kinds(bases["llama"].model.config).window is None


def test_a_window_counts_real_slots_not_columns(bases):
    model = bases["mistral"].model
    assert layer_kinds(model.config).kinds == (SLIDING,) * 3
    real = TINY_WINDOW + 2
    # [pad pad | real slots], with three padding columns in the middle (a neighbour's longer prompt).
    mask = torch.tensor([[0, 0, 1] + [0, 0, 0] + [1] * (real - 1)])
    allowed = forward_mask(model, mask, 1)  # sdpa: booleans, B x 1 x Q x S
    assert allowed.dtype == torch.bool and allowed.shape == (1, 1, 1, mask.shape[1])
    seen = allowed[0, 0, 0].nonzero().flatten().tolist()
    # The last query is real slot `real` (1-based): it sees the last TINY_WINDOW real slots, padding aside.
    assert seen == list(range(mask.shape[1] - TINY_WINDOW, mask.shape[1]))
    # Prefill: padding queries see themselves only, so no softmax row is empty.
    prefill = forward_mask(model, mask, mask.shape[1])[0, 0]
    assert prefill[0].nonzero().flatten().tolist() == [0] and prefill[2].nonzero().flatten().tolist() == [2]
    assert prefill[6].nonzero().flatten().tolist() == [2, 6]  # the first real slot after the gap
    # The sliding layers may hold only the last slots: the mask keeps those columns.
    assert forward_mask(model, mask, 1, sliding_slots=TINY_WINDOW)[0, 0, 0].all()


def test_a_model_of_both_kinds_gets_one_mask_a_kind_in_its_attention_format(bases):
    model = bases["gemma2"].model
    assert model.config._attn_implementation == "eager"
    masks = forward_mask(model, torch.ones(1, TINY_WINDOW + 5, dtype=torch.long), 1)
    assert set(masks) == {FULL, SLIDING}
    assert masks[FULL].dtype == model.dtype and (masks[FULL] == 0).all()  # eager: an additive mask
    assert (masks[SLIDING] < 0).sum() == 5


def test_layers_of_other_kinds_are_refused_in_one_line():
    config = AutoConfig.for_model("llama4_text", num_hidden_layers=4, attention_chunk_size=8)  # Llama 4
    with pytest.raises(
        ValueError, match="full and sliding-window attention only; this model has chunked_attention"
    ):
        check_layer_kinds(config)
