"""PEFT export: an expert written as a PEFT adapter that `PeftModel.from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

from peft import PrefixTuningConfig, PromptTuningConfig, TaskType
from safetensors.torch import save_file
from transformers import PreTrainedModel

from workers.expert_file import Expert


class PeftExportError(ValueError):
    """An expert that no single PEFT adapter can hold (a deep prefix and input tokens together)."""


def export_peft_adapter(expert: Expert, model: PreTrainedModel, out_dir: Path) -> Path:
    """Write an expert as a PEFT adapter that `PeftModel.from_pretrained` loads, giving the same logits.

    Input-only: a PROMPT_TUNING adapter. Deep-only: a PREFIX_TUNING one (no projection). A composed expert
    has no single PEFT form (PEFT runs one prompt-learning adapter at a time): PeftExportError.
    """
    tokens, width = expert.prompt.shape
    if expert.prefix is not None and tokens:
        raise PeftExportError(
            f"expert {expert.meta.culture!r} has a deep prefix and {tokens} input tokens: "
            "no single PEFT adapter holds both"
        )
    if expert.prefix is not None:
        tokens, layers, _, kv_heads, head_dim = expert.prefix.shape
        # PEFT's GQA rule (#1901): a prefix token is num_layers x 2 x num_key_value_heads x head_dim.
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=tokens,
            token_dim=kv_heads * head_dim,
            num_attention_heads=kv_heads,
            num_layers=layers,
            num_transformer_submodules=1,
            prefix_projection=False,
            base_model_name_or_path=expert.meta.base_model,
        )
        # One row per virtual token, flattened as PEFT views it: (layer, key/value, head, head_dim).
        weights = expert.prefix.reshape(tokens, -1)
    else:
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=tokens,
            token_dim=width,
            num_transformer_submodules=1,
            num_attention_heads=model.config.num_attention_heads,
            num_layers=model.config.num_hidden_layers,
            base_model_name_or_path=expert.meta.base_model,
        )
        weights = expert.prompt
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(
        {"prompt_embeddings": weights.detach().float().cpu().contiguous()},
        out_dir / "adapter_model.safetensors",
    )
    return out_dir
