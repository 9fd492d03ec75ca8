"""ExpertPool: replicas that hold the frozen base and every expert, and serve them through one decode engine.

Serve's multiplexing (`@serve.multiplexed`) batches requests per model id only; here a request carries its
committee, and one continuous-batching engine a replica (`workers.engine.DecodeEngine`, on its own thread)
runs them all: generations join and leave the running batch between decode steps, opinions are answered
between steps, every row with its own expert's soft prompt. Experts come from a directory or the MLflow
registry and are reloaded, without a restart, when the source changes: a request is resolved against one
version of the experts and prefilled with that version's bank, so a reload swaps banks between steps and no
request fails or mixes two versions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import ray
from ray import serve
from ray.serve.metrics import Counter, Histogram

from workers.base_model import load_frozen_base
from workers.chat import chat_prompt
from workers.committees import BASE, Committee, member_indices
from workers.detokenize import Detokenizer
from workers.engine import Batch, DecodeEngine, TokenStream
from workers.expert_store import DirectorySource, ExpertSnapshot, RegistrySource, Similarity
from workers.generation import DecodeRequest, stop_token_ids
from workers.prompts import Expert, SoftPromptBank, bank_from_experts
from workers.scoring import EncodedQuestion, encode_question

logger = logging.getLogger("ray.serve")
# Names an actor that each request waits at before it reaches the engine, and (with STEP_GATE appended) one
# that the engine waits at before each decode step: tests hold the pool busy at an exact point.
GATE_ENV = "SHORES_POOL_GATE"
GATE_NAMESPACE = "shores"
STEP_GATE = "-steps"
WHOLE = 1 << 30  # encode the whole prompt: its length is checked against the context window, not cut


@dataclass
class OpinionJob:
    """An opinion question for a committee: the pool's unit of batching."""

    question: str
    options: list[str]
    committee: Committee


@dataclass
class GenerateJob:
    """A text to continue (a raw prompt or a chat conversation) for a committee."""

    committee: Committee
    max_new_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class ExpertSet:
    """One loaded version of the experts: swapped in whole, so a batch never sees half of a reload."""

    version: str
    experts: list[Expert]
    versions: dict[str, str]  # culture -> the version of its expert that answers
    similarity: Similarity
    bank: SoftPromptBank | None = None
    index: dict[str, int] = field(default_factory=dict)


# ---- the pool's replies: what the router reads, and what it turns into JSON ----


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


@dataclass
class ExpertCard:
    """One served expert, as GET /v1/experts shows it."""

    culture: str
    iso: str
    version: str
    descriptor: str
    val_alignment: float | None
    base_model: str


@dataclass
class Catalogue:
    """What the router needs to build committees: the experts, their versions and survey similarity."""

    version: str
    experts: list[ExpertCard]
    similarity: Similarity
    base_model: str
    fingerprint: str


@dataclass
class OpinionAnswer:
    """A committee's option distribution, and which version of each member answered."""

    distribution: list[float]
    versions: dict[str, str]
    experts_version: str


@dataclass
class GenerateAnswer:
    """A committee's continuation, and which version of each member answered."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
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
    """One generated token and the text it completes ("" while it completes no character)."""

    token: int
    text: str


@dataclass
class GenerateEnd:
    """A stream's last event: why it ended, and the text still held back (the pieces then add up to the whole)."""

    finish_reason: str
    completion_tokens: int
    text: str


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
    running_requests: int  # the engine's running batch now
    running_rows: int
    waiting_requests: int
    engine_steps: int
    finished: dict[str, int]  # the engine's requests by finish reason (stop, length, cancelled, error)


@dataclass(frozen=True)
class PoolSettings:
    """What a replica uses from the experiment config (serve/app.py builds it): model, experts, batching."""

    base_model: str
    dtype: str
    device: str
    source: DirectorySource | RegistrySource
    max_rows: int  # rows (committee members) in the engine's running batch
    per_expert: bool  # opinions: one forward pass per expert instead of mixed batches (benchmarks)
    reload_interval_s: float  # 0: never look for new experts


class PoolStats:
    """Counters that show batching at work (GET /v1/status reports them)."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.largest_batch = 0
        self.most_experts_in_a_batch = 0
        self.reloads = 0
        self.closed_early = 0
        self.recent: deque[dict] = deque(maxlen=16)  # the last batches: kind, requests, rows, experts

    def record(self, batch: Batch) -> None:
        self.batches += 1
        self.rows += batch.rows
        self.largest_batch = max(self.largest_batch, batch.requests)
        self.most_experts_in_a_batch = max(self.most_experts_in_a_batch, len(batch.experts))
        self.recent.append(
            {
                "kind": batch.kind,
                "requests": batch.requests,
                "rows": batch.rows,
                "experts": list(batch.experts),
            }
        )


class PoolMetrics:
    """The pool's series on Ray's Prometheus endpoint: the engine's batches, time to first token, tokens."""

    def __init__(self) -> None:
        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        self.batch_rows = Histogram(
            "shores_batch_rows",
            "Rows (committee members) in one engine forward: an opinion batch or a decode step",
            sizes,
            tag_keys=("kind",),
        )
        self.batch_experts = Histogram(
            "shores_batch_experts", "Distinct experts in one engine forward", sizes, tag_keys=("kind",)
        )
        self.tokens = Counter("shores_generated_tokens", "Tokens generated, by expert", tag_keys=("expert",))
        self.first_token = Histogram(
            "shores_time_to_first_token_s",
            "Seconds from a generation reaching the engine to its first token, by the committee's lead expert",
            [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("expert",),
        )

    def batch(self, batch: Batch) -> None:
        self.batch_rows.observe(batch.rows, tags={"kind": batch.kind})
        self.batch_experts.observe(len(batch.experts), tags={"kind": batch.kind})


Answer = TypeVar("Answer")


# A replica that cannot load its experts fails the same way every time: three tries, not Serve's twenty.
@serve.deployment(max_ongoing_requests=64, max_constructor_retry_count=3)
class ExpertPool:
    """One replica: the frozen base, every expert in one prompt bank, one decode engine for every request."""

    def __init__(self, settings: PoolSettings):
        self.settings = settings
        self.started = time.time()
        self.loop = asyncio.get_running_loop()
        self.base = load_frozen_base(settings.base_model, settings.dtype, settings.device)
        self.context_window = getattr(self.base.model.config, "max_position_embeddings", None)
        self.gate = os.environ.get(GATE_ENV)
        self.source = settings.source
        self.experts = self._index(self.source.load(self.base))
        self.stats = PoolStats()
        self.metrics = PoolMetrics()
        self.engine = DecodeEngine(
            self.base,
            self.experts.bank,
            stop_token_ids(self.base),
            max_rows=settings.max_rows,
            per_expert=settings.per_expert,
        )
        self.engine.on_batch = self._on_batch
        if self.gate:
            self.engine.step_hook = self._pass_step_gate
        self.engine.start()
        self.watcher = None
        if settings.reload_interval_s > 0:
            self.watcher = self.loop.create_task(self._watch(settings.reload_interval_s))
        logger.info(
            "ExpertPool ready: %s with %d experts on %s",
            self.base.name,
            len(self.experts.experts),
            self.base.device,
        )

    def __del__(self) -> None:
        # Serve calls this when the replica shuts down: running requests end as cancelled.
        if getattr(self, "watcher", None) is not None:
            self.watcher.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.stop()

    def _index(self, loaded: ExpertSnapshot) -> ExpertSet:
        bank = bank_from_experts(loaded.experts, self.base.device) if loaded.experts else None
        index = {e.meta.culture: i for i, e in enumerate(loaded.experts)}
        return ExpertSet(loaded.version, loaded.experts, loaded.versions, loaded.similarity, bank, index)

    async def _watch(self, interval: float) -> None:
        """Look for a new version of the experts every `interval` seconds; keep serving the old ones meanwhile."""
        failed = None
        while True:
            await asyncio.sleep(interval)
            version = None
            try:
                version = await self.loop.run_in_executor(None, self.source.version)
                if version in (self.experts.version, failed):
                    continue
                loaded = await self.loop.run_in_executor(
                    None, lambda: self._index(self.source.load(self.base))
                )
                # Requests resolved from now on use the new set; those submitted already keep their bank.
                self.experts, self.engine.bank, failed = loaded, loaded.bank, None
                self.stats.reloads += 1
                logger.info("reloaded experts: version %s, %s", loaded.version, loaded.versions)
            except Exception as err:  # a half-written or bad expert must not take the replica down
                failed = version  # not retried until the source changes again
                logger.warning("keeping experts %s: reload failed: %s", self.experts.version, err)

    async def catalogue(self) -> Catalogue:
        """The experts this replica serves, their versions, and the survey similarity table."""
        experts = self.experts
        cards = [
            ExpertCard(
                culture=e.meta.culture,
                iso=e.meta.iso,
                version=experts.versions[e.meta.culture],
                descriptor=e.meta.descriptor,
                val_alignment=e.meta.training.get("val_alignment"),
                base_model=e.meta.base_model,
            )
            for e in experts.experts
        ]
        return Catalogue(experts.version, cards, experts.similarity, self.base.name, self.base.fingerprint)

    async def health(self) -> PoolHealth:
        """This replica's identity, batching counters and what its engine holds now."""
        context = serve.get_replica_context()
        engine = self.engine
        return PoolHealth(
            replica=context.replica_id.unique_id,
            pid=os.getpid(),
            experts_version=self.experts.version,
            uptime_s=round(time.time() - self.started, 1),
            **(vars(self.stats) | {"recent": list(self.stats.recent)}),
            running_requests=engine.running,
            running_rows=engine.rows,
            waiting_requests=engine.waiting,
            engine_steps=engine.steps,
            finished=dict(engine.finished),
        )

    # ---- requests ----

    async def opinion(self, job: OpinionJob) -> OpinionAnswer:
        """A committee's option distribution for one question (answered by the engine between decode steps)."""
        async with self._admitted():
            experts = self.experts
            members = self._members(experts, job.committee)
            question = _prepared(lambda: self._question(job, experts))
            future = _prepared(lambda: self.engine.submit_opinion(question, members, experts.bank))
            self.stats.requests += 1
        distribution = await asyncio.wrap_future(future)  # cancelled with this task: the engine skips it
        return OpinionAnswer(
            [float(p) for p in distribution], self._versions(experts, job.committee), experts.version
        )

    async def generate(self, job: GenerateJob) -> GenerateAnswer:
        """A committee's joint continuation of one prompt, whole."""
        tokens: list[int] = []
        async for event in self._generation(job, None):
            if isinstance(event, GenerateStart):
                start = event
            elif isinstance(event, TokenPiece):
                tokens.append(event.token)
            else:
                end = event
        return GenerateAnswer(
            text=self.base.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=end.finish_reason,
            prompt_tokens=start.prompt_tokens,
            completion_tokens=end.completion_tokens,
            versions=start.versions,
            experts_version=start.experts_version,
        )

    async def stream(self, job: GenerateJob) -> AsyncIterator[GenerateStart | TokenPiece | GenerateEnd]:
        """A committee's joint continuation as it is decoded: a GenerateStart, a TokenPiece a token, a GenerateEnd.

        Errors in the request itself (422, 409) are raised before the first event. Called with
        `handle.options(stream=True)`; cancelling the call (the client went away) cancels the request in the
        engine, whose rows leave the batch at its next step.
        """
        async for event in self._generation(job, Detokenizer(self.base.tokenizer)):
            yield event

    async def _generation(
        self, job: GenerateJob, detokenizer: Detokenizer | None
    ) -> AsyncIterator[GenerateStart | TokenPiece | GenerateEnd]:
        async with self._admitted():
            experts = self.experts
            members = self._members(experts, job.committee)
            request = _prepared(lambda: self._decode_request(job, members, experts))
            tokens: TokenStream = _prepared(lambda: self.engine.stream(request, experts.bank))
            self.stats.requests += 1
        submitted, generation = time.perf_counter(), tokens.generation
        lead = max(job.committee.members, key=lambda m: m[1])[0]  # the TTFT series' expert
        try:
            async with tokens:  # leaving it early (the caller went away) cancels the request in the engine
                yield GenerateStart(
                    len(request.prompt_ids), self._versions(experts, job.committee), experts.version
                )
                first = True
                async for token in tokens:
                    if first:
                        self.metrics.first_token.observe(
                            time.perf_counter() - submitted, tags={"expert": lead}
                        )
                        first = False
                    yield TokenPiece(token, detokenizer.add(token) if detokenizer else "")
        finally:
            if not generation.done:
                self.stats.closed_early += 1  # the caller went away: leaving the block cancelled it
            for culture in job.committee.cultures if generation.tokens else []:
                self.metrics.tokens.inc(len(generation.tokens), tags={"expert": culture})
        rest = detokenizer.finish() if detokenizer else ""
        yield GenerateEnd(generation.finish_reason or "length", len(generation.tokens), rest)

    # ---- preparing a request ----

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """The test gate ($SHORES_POOL_GATE), then the body (which submits the request to the engine).

        With a gate, the engine admits nothing new from before the gate to the submission, so requests let
        through together join the running batch together.
        """
        if not self.gate:
            yield
            return
        with self.engine.held():
            await self._pass_gate()
            yield

    async def _pass_gate(self) -> None:
        """Wait at the gate actor named by $SHORES_POOL_GATE while it exists (tests: the pool held busy)."""
        try:
            gate = ray.get_actor(self.gate, namespace=GATE_NAMESPACE)
        except ValueError:  # no gate up: requests run
            return
        passage = gate.passage.remote()
        try:
            await passage
        except asyncio.CancelledError:  # the router gave up on this request: leave the gate too
            ray.cancel(passage)
            raise

    def _pass_step_gate(self) -> None:
        """On the engine thread, before a decode step: wait at the step gate while it exists (tests: a request
        held mid-decode, so that its client can go away while it runs)."""
        try:
            gate = ray.get_actor(self.gate + STEP_GATE, namespace=GATE_NAMESPACE)
            ray.get(gate.passage.remote())
        except Exception:  # noqa: BLE001 - no gate up (ValueError), or it went away: steps run
            return

    def _on_batch(self, batch: Batch) -> None:
        # On the engine thread: the counters and metrics are kept on the event loop.
        self.loop.call_soon_threadsafe(self._record, batch)

    def _record(self, batch: Batch) -> None:
        self.stats.record(batch)
        self.metrics.batch(batch)

    @staticmethod
    def _members(experts: ExpertSet, committee: Committee) -> list[tuple[int, float]]:
        """The committee as bank indices; ExpertsNotLoadedError if a member is not loaded (a reload raced)."""
        missing = [c for c in committee.cultures if c != BASE and c not in experts.index]
        if missing:
            raise ExpertsNotLoadedError(missing)
        return member_indices(committee, experts.index)

    def _question(self, job: OpinionJob, experts: ExpertSet) -> EncodedQuestion:
        question = encode_question(self.base.tokenizer, job.question, job.options, max_length=WHOLE)
        self._check_fits(len(question.input_ids), experts.bank, 0)
        return question

    def _decode_request(
        self, job: GenerateJob, members: list[tuple[int, float]], experts: ExpertSet
    ) -> DecodeRequest:
        tokenizer = self.base.tokenizer
        text = chat_prompt(tokenizer, job.messages) if job.messages is not None else job.prompt
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self._check_fits(len(ids), experts.bank, job.max_new_tokens)
        return DecodeRequest(ids, members, job.max_new_tokens, job.temperature, job.seed)

    def _check_fits(self, prompt_tokens: int, bank: SoftPromptBank | None, max_new_tokens: int) -> None:
        """A BadRequestError (422) when the prompt, soft prompt and new tokens overrun the context window."""
        if self.context_window is None:
            return
        virtual = bank.num_virtual_tokens if bank is not None else 0
        limit = self.context_window - virtual - max_new_tokens
        if prompt_tokens > limit:
            raise BadRequestError(
                f"the prompt is {prompt_tokens} tokens, over the limit of {limit}: the context window of "
                f"{self.context_window} less {virtual} soft-prompt tokens and {max_new_tokens} new tokens"
            )

    @staticmethod
    def _versions(experts: ExpertSet, committee: Committee) -> dict[str, str]:
        return {c: experts.versions.get(c, "base") for c in committee.cultures}


def _prepared(make: Callable[[], Answer]) -> Answer:
    """`make()`, preparing one request; its failure is its own, raised to its caller only.

    The client's fault (BadRequestError, or a value workers refuse) is a 422; anything else stays an internal error.
    """
    try:
        return make()
    except BadRequestError:
        raise
    except ValueError as err:
        raise BadRequestError(str(err)) from None
    except Exception:
        logger.exception("a request failed while being prepared")
        raise
