"""The engine read from asyncio: the `n` generations of one request as one stream of tokens (`Choices`).

The engine thread calls a request's listener with each token it picks (None once the request is done); `Choices`
moves them onto the caller's event loop. Serve's pool reads every generation this way, and so do the tests.
Leaving early is the caller's to say (`cancel`, or `close` with a reason): the rows leave the batch at the next
step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from workers.engine.decode_engine import DecodeEngine
from workers.engine.requests import DecodeRequest, Generation
from workers.prompts import SoftPromptBank


class Choices:
    """The `n` generations of one request in the engine, read as one stream of (choice, token or None)."""

    def __init__(self, engine: DecodeEngine, requests: Sequence[DecodeRequest], bank: SoftPromptBank | None):
        self.engine, self.queue = engine, asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(generation: Generation, token: int | None) -> None:  # on the engine thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (generation, token))

        self.generations: list[Generation] = []
        self.open = set(range(len(requests)))  # choices not ended yet
        try:
            for request in requests:
                self.generations.append(engine.submit(request, deliver, bank))
        except BaseException:
            self.cancel()  # those submitted already: the request fails whole
            raise
        self.index = {generation: i for i, generation in enumerate(self.generations)}
        self._tokens = 0

    async def next(self) -> tuple[int, int | None]:
        """The next token of a choice still open (None: the engine is done with it)."""
        while True:
            generation, token = await self.queue.get()
            index = self.index[generation]
            if index in self.open:  # a choice ended by a stop string: the tokens after it are dropped
                self._tokens += token is not None
                return index, token

    @property
    def first_token(self) -> bool:
        """Whether the token just returned is the request's first."""
        return self._tokens == 1

    def close(self, index: int, reason: str | None = None) -> None:
        """End choice `index`; with a reason, the engine too stops its rows (`stop`: a stop string was met)."""
        self.open.discard(index)
        if reason is not None:
            self.engine.cancel(self.generations[index], reason)

    def cancel(self) -> bool:
        """Cancel the choices still running in the engine (the caller went away); whether there were any."""
        running = [g for i, g in enumerate(self.generations) if i in self.open and not g.done]
        for generation in running:
            self.engine.cancel(generation)
        return bool(running)
