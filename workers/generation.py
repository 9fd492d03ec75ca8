"""Kept for serve/pool.py's `from workers.generation import ...` only: the engine's primitives now live in the
`workers.engine` package (requests, sampling, kv_cache, model_runner). New code imports them from there; this
module goes once serve imports `workers.engine`."""

from workers.engine import DecodeRequest, choice_seed, stop_token_ids

__all__ = ["DecodeRequest", "choice_seed", "stop_token_ids"]
