"""The engine's asyncio API for the tests: `stream`, `generate` and `opinion` over a running `DecodeEngine`, on
the engine's own stream (`workers.engine.Choices`, as serve's pool reads it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from workers.engine import CURRENT, Choices, Decoded, DecodeEngine, DecodeRequest
from workers.prompts import SoftPromptBank
from workers.scoring import EncodedQuestion


class TokenStream:
    """One request's tokens for `async for`; leaving early (or the task being cancelled) cancels the request."""

    def __init__(self, engine: DecodeEngine, request: DecodeRequest, bank: SoftPromptBank | None = CURRENT):
        self.choices = Choices(engine, [request], bank)
        [self.generation] = self.choices.generations

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        if not self.choices.open:
            raise StopAsyncIteration
        try:
            _, token = await self.choices.next()
        except asyncio.CancelledError:
            self.choices.cancel()
            raise
        if token is None:
            self.choices.close(0)
            if self.generation.error is not None:
                raise self.generation.error
            raise StopAsyncIteration
        return token

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.choices.cancel()


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
