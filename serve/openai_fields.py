"""Which fields of an OpenAI request shores honours, accepts and ignores, or refuses (`refuse_unsupported`, run
before validation: a 400 naming the first field that would change the output and is not honoured, as OpenAI
itself answers an unknown field). The generated HTTP reference lists them (serve/reference.py).
"""

from __future__ import annotations

import json
from typing import Any

from serve.errors import ApiError

_SHARED = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options"}
HONOURED = {
    "chat": _SHARED | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "committee_size"},
    "completions": _SHARED | {"prompt", "logprobs", "committee_size"},
}
HARMLESS = {  # accepted and ignored: bookkeeping, routing and caching hints that change no output
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
}
NO_OP: dict[str, list[Any]] = {  # refused unless they hold a value that changes nothing
    "tools": [None, []],
    "tool_choice": [None, "none"],
    "functions": [None, []],
    "function_call": [None, "none"],
    "response_format": [None, {"type": "text"}],
    "logit_bias": [None, {}],
    "presence_penalty": [None, 0],
    "frequency_penalty": [None, 0],
    "modalities": [None, ["text"]],
    "audio": [None],
    "prediction": [None],
    "reasoning_effort": [None],
    "verbosity": [None],
    "web_search_options": [None],
    "echo": [None, False],  # completions: would need the prompt's log probabilities
    "best_of": [None, 1],  # completions: also accepted when equal to n
    "suffix": [None, ""],  # completions: insertion
}
MESSAGE_NO_OP: dict[str, list[Any]] = {  # a message's keys besides role and content
    "name": [None],  # the chat template has no speaker names
    "tool_calls": [None, []],
    "tool_call_id": [None],
    "function_call": [None],
    "audio": [None],
    "refusal": [None],
}


def refuse_unsupported(data: dict, endpoint: str) -> None:
    """A 400 naming the first field of an OpenAI request that shores does not honour and that would change
    the output (`endpoint` is `chat` or `completions`)."""
    for key, value in data.items():
        if key in HONOURED[endpoint] or key in HARMLESS:
            continue
        if key not in NO_OP:
            raise ApiError(400, f"unknown field {key!r}", param=key)
        if value in NO_OP[key] or (key == "best_of" and value == data.get("n", 1)):
            continue
        raise ApiError(400, f"{key} is not supported by this server (only {_no_op(NO_OP[key])})", param=key)
    if endpoint == "chat" and isinstance(data.get("messages"), list):
        for i, message in enumerate(data["messages"]):
            if isinstance(message, dict):
                _refuse_in_message(i, message)
    prompt = data.get("prompt")
    if endpoint == "completions" and isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "prompt: token ids are not supported; send the prompt as text", param="prompt")


def _refuse_in_message(i: int, message: dict) -> None:
    if message.get("role") in ("tool", "function"):
        raise ApiError(
            400,
            f"messages[{i}].role: {message['role']} messages are not supported (no tools)",
            param="messages",
        )
    for key, value in message.items():
        if key not in ("role", "content") and value not in MESSAGE_NO_OP.get(key, [None]):
            raise ApiError(400, f"messages[{i}].{key} is not supported by this server", param="messages")
    content = message.get("content")
    for j, part in enumerate(content if isinstance(content, list) else []):
        if isinstance(part, dict) and part.get("type") != "text":
            raise ApiError(
                400,
                f"messages[{i}].content[{j}]: {part.get('type')} parts are not supported (text only)",
                param="messages",
            )


def _no_op(values: list[Any]) -> str:
    return " or ".join(json.dumps(v) for v in values)
