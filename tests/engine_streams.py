"""The engine's tokens as asyncio streams, for the tests: `stream`, `generate` and `opinion` over a running
`DecodeEngine` (serve's pool reads the engine its own way, serve/pool.py's `_Choices`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from workers.engine import CURRENT, Decoded, DecodeEngine, DecodeRequest, Generation
from workers.prompts import SoftPromptBank
from workers.scoring import EncodedQuestion


class TokenStream:
    """One request's tokens for `async for`; leaving early (or the task being cancelled) cancels the request."""

    def __init__(self, engine: DecodeEngine, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT):
        self._engine, self._loop, self._queue = engine, asyncio.get_running_loop(), asyncio.Queue()
        self.generation = engine.submit(request, self._deliver, bank)

    def _deliver(self, generation: Generation, token: int | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, token)  # called on the engine thread

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        try:
            token = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if token is None:
            self._queue.put_nowait(None)  # stay exhausted
            if self.generation.error is not None:
                raise self.generation.error
            raise StopAsyncIteration
        return token

    def cancel(self) -> None:
        """Cancel the request unless it is done: its rows leave the batch at the next step."""
        if not self.generation.done:
            self._engine.cancel(self.generation)

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def stream(
    engine: DecodeEngine, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT
) -> TokenStream:
    """The request's tokens as an async iterator, as they are picked (call from a running event loop)."""
    return TokenStream(engine, request, bank)


async def generate(
    engine: DecodeEngine, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT
) -> Decoded:
    """The request's whole continuation; cancelled if the awaiting task is."""
    async with stream(engine, request, bank) as tokens:
        async for _ in tokens:
            pass
    return tokens.generation.decoded()


async def opinion(
    engine: DecodeEngine,
    question: EncodedQuestion,
    members: Sequence[tuple[int, float]],
    bank: SoftPromptBank | None = CURRENT,
) -> np.ndarray:
    """A committee's mixed option distribution, answered between decode steps."""
    # A cancelled awaiting task cancels the future too (wrap_future): the engine then skips it.
    return await asyncio.wrap_future(engine.submit_opinion(question, members, bank))
