"""The router-pool protocol: what the Router asks an ExpertPool replica, what comes back, and the errors.

Everything here crosses a DeploymentHandle call (pickled by Ray). The pool answers in these shapes; the
router turns them into JSON (its own contract's or OpenAI's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.committees import Committee
from workers.expert_store import Similarity

# ---- requests ----


@dataclass
class OpinionJob:
    """An opinion question for a committee: the pool's unit of batching."""

    question: str
    options: list[str]
    committee: Committee


@dataclass
class GenerateJob:
    """A text to continue (a raw prompt or a chat conversation) for a committee.

    `n` generations of it (OpenAI's choices), each with its own seed (`choice_seed`); each ends before the
    first of its `stop` strings; with `logprobs` k each token carries its log probability and the k most likely.
    """

    committee: Committee
    max_new_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    temperature: float = 0.0
    seed: int | None = None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    n: int = 1


# ---- errors the router answers as 4xx ----


class ExpertsNotLoadedError(RuntimeError):
    """A committee names experts that this replica has not loaded (a reload raced the request): retry."""

    def __init__(self, missing: list[str]):
        super().__init__(missing)
        # Read by the router: raised through Ray, str() of the error also carries Ray's traceback header.
        self.message = f"experts {missing} are not loaded here (reloading?); retry"

    def __str__(self) -> str:
        return self.message


class BadRequestError(ValueError):
    """A request that cannot be answered as asked (too long a prompt): the client's fault, answered as a 422."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # read by the router: str() through Ray also carries a traceback header

    def __str__(self) -> str:
        return self.message


# ---- replies ----


@dataclass
class ExpertCard:
    """One served expert, as GET /v1/experts shows it."""

    culture: str
    iso: str
    version: str
    descriptor: str
    val_alignment: float | None
    base_model: str
    prior_weight: float = 0.0  # the shared prior's share in this expert's answers (`ExpertMeta.prior_weight`)


@dataclass
class Catalogue:
    """What the router needs to build committees: the experts, their versions and survey similarity."""

    version: str
    experts: list[ExpertCard]
    similarity: Similarity
    base_model: str
    fingerprint: str
    since: float = 0.0  # when the replica took this version from its source: the newer of two sets is later


@dataclass
class OpinionAnswer:
    """A committee's option distribution, and which version of each member answered."""

    distribution: list[float]
    versions: dict[str, str]
    experts_version: str


@dataclass
class Candidate:
    """One token of a committee's mixed distribution: its text alone, its UTF-8 bytes, its log probability."""

    text: str
    bytes: list[int]
    logprob: float


@dataclass
class TokenLogprobs:
    """A generated token's log probability, the most likely tokens at its step, and where its text starts in
    the choice's text (characters)."""

    chosen: Candidate
    top: list[Candidate]
    offset: int


@dataclass
class Choice:
    """One generation of a request, whole: its text (cut before a stop string), why it ended, its tokens."""

    index: int
    text: str
    finish_reason: str  # stop (a stop token or string) or length
    completion_tokens: int
    logprobs: list[TokenLogprobs] | None  # one per token, if asked


@dataclass
class GenerateAnswer:
    """A committee's continuations (one per choice), and which version of each member answered."""

    choices: list[Choice]
    prompt_tokens: int
    versions: dict[str, str]
    experts_version: str


@dataclass
class GenerateStart:
    """A stream's first event, once the request is in the engine: what the router puts in its first chunk."""

    prompt_tokens: int
    versions: dict[str, str]
    experts_version: str


@dataclass
class TokenPiece:
    """One generated token of choice `index` and the text it releases ("" while it completes no character,
    or while its text may begin a stop string)."""

    token: int
    text: str
    index: int = 0
    logprobs: TokenLogprobs | None = None


@dataclass
class GenerateEnd:
    """The last event of choice `index`: why it ended, its token count, and the text still held back (the pieces
    then add up to the choice's text). A stream ends after the last choice's GenerateEnd."""

    finish_reason: str
    completion_tokens: int
    text: str
    index: int = 0


@dataclass
class PoolHealth:
    """A replica's identity, batching counters and its engine now (GET /v1/status)."""

    replica: str
    pid: int
    experts_version: str
    uptime_s: float
    batches: int  # engine forward passes reported: opinion batches and decode steps
    requests: int  # requests handed to the engine
    rows: int
    largest_batch: int
    most_experts_in_a_batch: int
    reloads: int
    closed_early: int  # streams whose client went away before the end
    recent: list[dict]
    calls: dict[str, int]  # calls this replica took, by method (catalogue, opinion, generate, stream, health)
    running_requests: int  # the engine's running batch now
    running_rows: int
    waiting_requests: int
    engine_steps: int
    finished: dict[str, int]  # the engine's requests by finish reason (stop, length, cancelled, error)
    # The engine's KV cache in slots: `budget`; `used` (rows x padded width) and `needed` (the rows' real
    # lengths) now; `peak` used; `slot_steps_used` and `slot_steps_needed` summed over decode steps (their ratio
    # is the padding's cost).
    cache: dict[str, int] = field(default_factory=dict)
    reload_failures: int = 0  # reloads that failed (each retried with backoff)
    # The source's version not loaded yet (its reload failed, or is running).
    reload_pending: str | None = None
    last_good: bool = False  # serving the registry source's last good local copy: MLflow could not be read
