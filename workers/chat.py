"""A conversation as the model's prompt text: one format for training, evaluation and serving."""

from __future__ import annotations

from collections.abc import Sequence

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

NO_SYSTEM = {"role": "system", "content": ""}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """The conversation through the model's chat template where it has one, else plain role lines.

    A conversation without a system message gets an empty one. Templates such as SmolLM2's and Qwen's would
    otherwise insert their default system text ("You are a helpful AI assistant named SmolLM, trained by
    Hugging Face"): 16 of a survey row's ~117 tokens, the place an expert's prompt stands in for.
    """
    messages = list(messages)
    if not tokenizer.chat_template:
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join([*lines, "Assistant:"])
    if not messages or messages[0]["role"] != "system":
        try:
            return tokenizer.apply_chat_template(
                [NO_SYSTEM, *messages], tokenize=False, add_generation_prompt=True
            )
        except TemplateError:  # a template without a system role (Gemma's) refuses it
            pass
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
