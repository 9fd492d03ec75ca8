"""How a pool replica reads its engine: the `n` generations of one request as one stream (`Choices`), each
choice's text as its tokens come (`ChoiceText`), and preparing a request so that its failure is its own
(`prepared`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from serve.protocol import BadRequestError
from workers.detokenize import Detokenizer, StopStrings
from workers.engine import CacheBudgetError, DecodeEngine, DecodeRequest, Generation
from workers.prompts import SoftPromptBank

logger = logging.getLogger("ray.serve")
Answer = TypeVar("Answer")


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


class ChoiceText:
    """One choice's text as its tokens come: detokenised, cut before its first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]):
        self.detokenizer, self.stop = Detokenizer(tokenizer), StopStrings(stop)
        self.tokens = 0
        self.sent = ""  # the text released so far

    def add(self, token: int) -> str:
        """The text that `token` releases."""
        self.tokens += 1
        piece = self.stop.feed(self.detokenizer.add(token))
        self.sent += piece
        return piece

    def finish(self, reason: str) -> tuple[str, str]:
        """The text still held back at the end, and the finish reason (`stop` if that text met a stop string)."""
        rest = self.stop.feed(self.detokenizer.finish())
        if self.stop.stopped:
            return rest, "stop"
        return rest + self.stop.finish(), reason


def prepared(make: Callable[[], Answer]) -> Answer:
    """`make()`, preparing one request; its failure is its own, raised to its caller only.

    The client's fault (BadRequestError, or a value workers refuse) is a 422; anything else stays an internal error.
    """
    try:
        return make()
    except BadRequestError:
        raise
    except CacheBudgetError as err:
        raise BadRequestError(
            f"{err} (serve.limits.max_cache_tokens): shorten the prompt, max_new_tokens or the committee"
        ) from None
    except ValueError as err:
        raise BadRequestError(str(err)) from None
    except Exception:
        logger.exception("a request failed while being prepared")
        raise
