"""What the engine is asked and what it answers: requests, results and errors, and the checks at submit.

Every decode request is a committee: one row per member, each row with its own expert's soft prompt. A
`DecodeRequest` names its prompt tokens, its members (expert index or NO_EXPERT, weight) and how to pick tokens;
its `Generation` is the engine's record of it (the tokens picked so far, why it ended). An opinion request asks
for a committee's mixed option distribution of one question (`Opinion`). Nothing here runs the model.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.committees import committee_weights
from workers.defaults import MAX_TOP_LOGPROBS, SEED_LIMIT
from workers.prompts import NO_EXPERT

if TYPE_CHECKING:
    import torch

    from workers.prompts import SoftPromptBank
    from workers.scoring import EncodedQuestion

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily: logits / ~0 would be inf, then NaN
FINISH_REASONS = ("stop", "length", "cancelled", "error")
CURRENT: Any = object()  # submit()'s default bank: the engine's bank at the time
Listener = Callable[["Generation", "int | None"], None]  # a picked token, or None once the request is done
# Tests: called for each request of a batch at "prefill", "decode" (before the forward), "merge" (its rows joining
# the running cache) and "retire" (its rows kept in the cache surgery); raise to make that batch operation fail.
FaultHook = Callable[["Generation", str], None]


@dataclass
class DecodeRequest:
    """One text to continue: its prompt tokens, its committee as (expert index or NO_EXPERT, weight).

    Sampling (temperature above 0) draws from the committee's mixed distribution, cut to its `top_p` nucleus.
    With `logprobs` k, each picked token carries its log probability and the k most likely tokens' (TokenLogprobs).
    """

    prompt_ids: list[int]
    members: list[tuple[int, float]]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    top_p: float = 1.0
    logprobs: int | None = None


@dataclass
class TokenLogprobs:
    """A picked token's log probability in its committee's mixed distribution, and the most likely tokens'."""

    logprob: float
    top: list[tuple[int, float]]  # (token, log probability), the most likely first


@dataclass
class Decoded:
    """The new tokens of one request and why decoding stopped: `stop` (a stop token) or `length`."""

    token_ids: list[int]
    finish_reason: str


@dataclass(frozen=True)
class Batch:
    """One forward pass of the engine, as reported to `on_batch`: an opinion batch or a decode step."""

    kind: str  # "opinion" or "decode"
    requests: int
    rows: int
    experts: tuple[str, ...]  # the distinct experts of its rows (`base` for the plain model), sorted


class EngineStopped(RuntimeError):
    """The engine stopped before the request finished."""


class EngineBroken(RuntimeError):
    """The engine cannot step: its thread is gone, or its last step failed beyond one request."""


class CacheBudgetError(ValueError):
    """A request whose rows could never fit the engine's cache budget, however empty the batch."""

    def __init__(self, slots: int, budget: int, what: str):
        super().__init__(f"{what} needs {slots} cache slots, over the cache budget of {budget}")
        self.slots, self.budget = slots, budget


@dataclass(eq=False)
class Generation:
    """One submitted decode request: the tokens picked so far and, once done, why it ended.

    `finish_reason` is `stop` (a stop token), `length` (max_new_tokens), `cancelled` or `error` (see `error`).
    """

    id: int
    request: DecodeRequest
    listener: Listener | None = None
    bank: SoftPromptBank | None = field(default=None, repr=False)  # the prompts it is prefilled with
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, if the request asked
    finish_reason: str | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel_requested: bool = False
    cancel_reason: str = "cancelled"  # the finish reason a cancel gives (`stop`: a stop string was met)
    # Engine state: member weights (summing to 1), the sampler, the token to feed at the next decode step.
    weights: list[float] = field(default_factory=list, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    next_token: int | None = None
    slots_per_row: int = 0  # a row's cache slots once grown to its longest: prefix, prompt, max_new_tokens
    prompt_slots: int = 0  # a row's slots at prefill: prefix and prompt (the step budget's cost per row)
    waited: int = 0  # steps it has waited to be admitted

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    @property
    def rows(self) -> int:
        return len(self.request.members)

    def decoded(self) -> Decoded:
        """The finished result as static batching returns it; raises the request's error if it failed."""
        if self.error is not None:
            raise self.error
        return Decoded(list(self.tokens), self.finish_reason or "length")


@dataclass(eq=False)
class Opinion:
    """One submitted opinion request: a question, its committee, and the future of its option distribution."""

    question: EncodedQuestion
    members: list[tuple[int, float]]
    future: Future
    bank: SoftPromptBank | None
    slots_per_row: int = 0
    waited: int = 0

    @property
    def rows(self) -> int:
        return len(self.members) * len(self.question.orders())


def check_request(request: DecodeRequest) -> None:
    """Refuse a request that cannot be decoded, with one clear line (ValueError)."""
    committee_weights([w for _, w in request.members])
    if request.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not math.isfinite(request.temperature):
        raise ValueError(f"temperature must be a finite number, got {request.temperature}")
    if request.seed is not None and not 0 <= request.seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {request.seed}")
    if not 0 <= request.top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {request.top_p}")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}")


def check_members(members: Sequence[tuple[int, float]], bank: SoftPromptBank | None) -> None:
    """Refuse members that name no expert of `bank` (ValueError)."""
    for expert, _ in members:
        if expert != NO_EXPERT and not (bank is not None and 0 <= expert < len(bank.cultures)):
            raise ValueError(f"no expert {expert} in the bank")


def is_greedy(request: DecodeRequest) -> bool:
    """Whether a request picks the most likely token (temperature under GREEDY_BELOW) rather than sampling."""
    return request.temperature < GREEDY_BELOW


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request that asks for several (OpenAI's `n`): the request's own seed for
    the first, so that it answers as the same request alone, then seeds derived from it (None stays None)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_LIMIT


def prompt_width(bank: SoftPromptBank | None) -> int:
    """The prompt slots a row of `bank` takes before its text (0 without a bank)."""
    return bank.num_virtual_tokens if bank is not None else 0
