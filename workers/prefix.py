"""Deep prompts (prefix tuning, P-tuning v2): per-layer virtual keys and values a row's KV cache starts with.

A prefix is L_p x num_layers x 2 (key, value) x num_key_value_heads x head_dim: what the model's own cache
holds for L_p tokens, so the model attends to it as to tokens it has already seen (keys as cached, i.e.
after any rotary embedding). This is PEFT's PREFIX_TUNING without the projection (`prefix_projection=False`).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from workers.attention import forward_mask, unwindowed_cache


def cache_kwarg(model: PreTrainedModel) -> str:
    # transformers 5 renames `past_key_values` to `cache` (the old name warns, then goes in 5.40).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of a model's cache, read as PEFT reads them for prefix tuning.

    GQA models (SmolLM2, Llama) cache fewer key/value heads than they have attention heads.
    """
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def prefix_cache(
    model: PreTrainedModel, prefixes: torch.Tensor, trained_layers: int | None = None
) -> DynamicCache:
    """A cache holding B rows of prefixes (B x P x N x 2 x H x Dh), ready to be extended by a forward pass.

    The top `trained_layers` layers (None: all) keep their autograd history, so a loss on the forward's
    output reaches the prefix Parameters there. The layers below enter as constants: with no input that
    needs a gradient, autograd records nothing below the lowest trained layer, and backward stops there.
    """
    per_layer = prefixes.permute(2, 3, 0, 4, 1, 5)  # N x 2 x B x H x P x Dh, the cache's layout
    frozen = 0 if trained_layers is None else max(0, len(per_layer) - trained_layers)
    layers = [(k.detach(), v.detach()) if i < frozen else (k, v) for i, (k, v) in enumerate(per_layer)]
    return DynamicCache(ddp_cache_data=layers)  # every layer keeps every slot: `workers.attention`


@torch.no_grad()
def text_prefix(model: PreTrainedModel, ids: list[int], length: int) -> torch.Tensor:
    """The keys and values the frozen model caches for a text, its tokens repeated or cut to `length`.

    A prefix of exactly the text's tokens makes the model answer as if the text came first (the persona
    init: an untrained deep expert behaves like the persona prompt).
    """
    cache = unwindowed_cache(model)  # a text longer than a window keeps all its slots, as a prefix does
    row = torch.tensor([ids], device=model.device)
    mask = forward_mask(model, torch.ones_like(row), row.shape[1])
    model(input_ids=row, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # N 2 H T Dh
    kv = kv.permute(3, 0, 1, 2, 4).float().cpu()  # T x N x 2 x H x Dh
    return kv[torch.arange(length) % len(ids)]


def random_prefix(like: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Normal noise on the scale of the model's own keys and values (`like`, e.g. a text's), per layer and K/V.

    PEFT's prefix embedding starts as normal noise too; scaling it to the cache keeps attention logits in range.
    """
    scale = like.std(dim=(0, 3, 4), keepdim=True)  # 1 x N x 2 x 1 x 1
    noise = torch.randn(length, *like.shape[1:], generator=generator)
    return noise * scale


def start_cache(model: PreTrainedModel, inputs: dict) -> DynamicCache:
    """The cache a forward pass over `inputs` extends: the rows' prefixes (taken out of `inputs`), else empty."""
    cache = inputs.pop(cache_kwarg(model), None)
    return cache if cache is not None else unwindowed_cache(model)
