"""Continuous batching: a decode loop that admits and retires requests between steps (vLLM's engine, small).

The package is laid out as vLLM's engine is, one concept a module:

- `requests`: what is asked and answered (DecodeRequest, Generation, Decoded, the opinion item, the errors) and
  the checks at submit;
- `scheduler`: the waiting queues, admission, the token and cache budgets, fairness (`max_wait_steps`); counts
  only, no torch;
- `kv_cache`: the running batch's KV cache (merge, keep rows, truncate, slot accounting, spare slots);
- `sampling`: mixing a committee's distributions, picking tokens (greedy, nucleus), log probabilities;
- `model_runner`: every forward pass (prefill, decode, opinions) and the picks after decode;
- `core`: the step loop (admit, decode, pick, retire), fault isolation, composing the parts above;
- `decode_engine`: `DecodeEngine`, the core's API: submit from any thread, its own thread, health;
- `streams`: a request's generations read from asyncio (`Choices`), as the pool and the tests read them.

The names below are the engine's public API: import them from `workers.engine`.
"""

from workers.engine.decode_engine import DecodeEngine
from workers.engine.kv_cache import (
    DEFAULT_CACHE_TOKENS,
    SPARE_SLOTS,
    SpareSlotsLayer,
    auto_cache_tokens,
    slot_bytes,
    with_spare_slots,
)
from workers.engine.model_runner import stop_token_ids
from workers.engine.requests import (
    CURRENT,
    FINISH_REASONS,
    GREEDY_BELOW,
    Batch,
    CacheBudgetError,
    Decoded,
    DecodeRequest,
    EngineBroken,
    EngineStopped,
    FaultHook,
    Generation,
    Listener,
    TokenLogprobs,
    check_request,
    choice_seed,
    is_greedy,
)
from workers.engine.sampling import (
    LOGPROB_FLOOR,
    mixed_distributions,
    nucleus,
    pick_tokens,
    sampler,
    token_logprobs,
)
from workers.engine.streams import Choices

__all__ = [
    "CURRENT",
    "DEFAULT_CACHE_TOKENS",
    "FINISH_REASONS",
    "GREEDY_BELOW",
    "LOGPROB_FLOOR",
    "SPARE_SLOTS",
    "Batch",
    "CacheBudgetError",
    "Choices",
    "DecodeEngine",
    "DecodeRequest",
    "Decoded",
    "EngineBroken",
    "EngineStopped",
    "FaultHook",
    "Generation",
    "Listener",
    "SpareSlotsLayer",
    "TokenLogprobs",
    "auto_cache_tokens",
    "check_request",
    "choice_seed",
    "is_greedy",
    "mixed_distributions",
    "nucleus",
    "pick_tokens",
    "sampler",
    "slot_bytes",
    "stop_token_ids",
    "token_logprobs",
    "with_spare_slots",
]
