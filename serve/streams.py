"""How a pool replica turns the engine's tokens into answers: each choice's text as its tokens come
(`ChoiceText`; the tokens themselves come through the engine's own stream, `workers.engine.Choices`), and
preparing a request so that its failure is its own (`prepared`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from serve.protocol import BadRequestError
from workers.detokenize import Detokenizer, StopStrings
from workers.engine import CacheBudgetError

logger = logging.getLogger("ray.serve")
Answer = TypeVar("Answer")


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
