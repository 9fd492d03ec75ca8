"""Kept for serve's `from workers.generation import ...` only (serve/pool.py, serve/streams.py): the engine's
primitives now live in the `workers.engine` package (requests, sampling, kv_cache, model_runner). New code
imports them from `workers.engine`; this module goes once serve does."""

from workers.engine import DecodeRequest, choice_seed, stop_token_ids

__all__ = ["DecodeRequest", "choice_seed", "stop_token_ids"]
