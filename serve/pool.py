"""ExpertPool: replicas that hold the frozen base and every expert, and serve them through one decode engine.

Serve's multiplexing (`@serve.multiplexed`) batches requests per model id only; here a request carries its
committee, and one continuous-batching engine a replica (`workers.engine.DecodeEngine`, on its own thread)
runs them all: generations join and leave the running batch between decode steps, opinions are answered
between steps, every row with its own expert's soft prompt. Experts come from a directory or the MLflow
registry and are reloaded, without a restart, when the source changes: a request is resolved against one
version of the experts and prefilled with that version's bank, so a reload swaps banks between steps and no
request fails or mixes two versions. A reload that fails is retried with backoff until it loads, so replicas
converge on the source's version; a replica whose registry cannot be read when it starts serves the registry
source's last good local copy, and says so (a warning, the `shores_experts_last_good` gauge, `/v1/status`).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram
from transformers import PreTrainedTokenizerBase

from serve.protocol import (
    BadRequestError,
    Candidate,
    Catalogue,
    Choice,
    ExpertCard,
    ExpertsNotLoadedError,
    GenerateAnswer,
    GenerateEnd,
    GenerateJob,
    GenerateStart,
    OpinionAnswer,
    OpinionJob,
    PoolHealth,
    TokenLogprobs,
    TokenPiece,
)
from workers.base_model import load_frozen_base
from workers.chat import chat_prompt
from workers.committees import BASE, Committee, member_indices
from workers.detokenize import Detokenizer, StopStrings, token_text
from workers.engine import Batch, CacheBudgetError, DecodeEngine, EngineStopped, Generation, auto_cache_tokens
from workers.expert_file import Expert
from workers.expert_store import DirectorySource, ExpertSnapshot, RegistryError, RegistrySource, Similarity
from workers.generation import DecodeRequest, choice_seed, stop_token_ids
from workers.prompts import SoftPromptBank, bank_from_experts
from workers.scoring import EncodedQuestion, encode_question

logger = logging.getLogger("ray.serve")
# A fault hook (tests, bench/serve_load.py): names a file: while it exists, the first replica to reload after it appeared fails every reload (tests: one
# replica held behind the others at an exact point, until the file is removed).
RELOAD_FAULT_ENV = "SHORES_RELOAD_FAULT"
BACKOFF_CAP = 32  # a failing reload is retried after 2, 4, 8, ... and at most 32 reload intervals
WHOLE = 1 << 30  # encode the whole prompt: its length is checked against the context window, not cut


@dataclass
class ExpertSet:
    """One loaded version of the experts: swapped in whole, so a batch never sees half of a reload."""

    version: str
    experts: list[Expert]
    versions: dict[str, str]  # culture -> the version of its expert that answers
    similarity: Similarity
    since: float  # when it was taken from the source: the router follows the newest set, never an older one
    bank: SoftPromptBank | None = None
    index: dict[str, int] = field(default_factory=dict)


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
    # The engine's cache budget in slots; None: what fits (auto_cache_tokens).
    max_cache_tokens: int | None = None
    cache_memory_fraction: float = 0.5  # of a GPU's free memory, for the cache budget when it is None
    max_tokens_per_step: int = 2048  # prompt tokens one engine step prefills


class PoolStats:
    """Counters that show batching at work (GET /v1/status reports them)."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.largest_batch = 0
        self.most_experts_in_a_batch = 0
        self.reloads = 0
        self.reload_failures = 0  # reloads that failed (the source unreadable, or its set not loaded)
        self.reload_pending: str | None = None  # a version of the source not loaded yet: retried until it is
        self.last_good = False  # serving the last good local copy: the registry could not be read at start
        self.closed_early = 0
        self.recent: deque[dict] = deque(maxlen=16)  # the last batches: kind, requests, rows, experts
        self.calls: collections.Counter[str] = collections.Counter()  # calls taken, by method

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
        self.reload_failures = Counter(
            "shores_expert_reload_failures", "Reloads of the experts that failed (each retried with backoff)"
        )
        self.last_good = Gauge(
            "shores_experts_last_good",
            "1 while the replica serves its last good local copy of the experts: the registry could not be read",
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
        self.source = settings.source
        self.stats = PoolStats()
        self.metrics = PoolMetrics()
        self.experts = self._first_load()
        self.token_texts: dict[int, tuple[str, list[int]]] = {}
        self.engine = DecodeEngine(
            self.base,
            self.experts.bank,
            stop_token_ids(self.base),
            max_tokens_per_step=settings.max_tokens_per_step,
            max_rows=settings.max_rows,
            per_expert=settings.per_expert,
            max_cache_tokens=settings.max_cache_tokens
            or auto_cache_tokens(self.base, settings.cache_memory_fraction),
        )
        self.engine.on_batch = self._on_batch
        self.engine.start()
        self.watcher = None
        if settings.reload_interval_s > 0:
            self.watcher = self.loop.create_task(self._watch(settings.reload_interval_s))
        logger.info(
            "ExpertPool ready: %s with %d experts on %s, a cache budget of %d slots",
            self.base.name,
            len(self.experts.experts),
            self.base.device,
            self.engine.max_cache_tokens,
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
        return ExpertSet(
            loaded.version, loaded.experts, loaded.versions, loaded.similarity, loaded.since, bank, index
        )

    def _first_load(self) -> ExpertSet:
        """The source's experts; while the registry cannot be read, its last good local copy (if any)."""
        try:
            loaded = self._index(self.source.load(self.base))
        except RegistryError as err:
            kept = self.source.last_good(self.base)
            if kept is None:
                raise
            logger.warning("serving the last good copy of experts %s: %s", kept.version, err)
            self._serving_last_good(True)
            return self._index(kept)
        self._serving_last_good(False)
        return loaded

    def _serving_last_good(self, stale: bool) -> None:
        self.stats.last_good = stale
        self.metrics.last_good.set(int(stale))

    async def _watch(self, interval: float) -> None:
        """Look for a new version of the experts every `interval` seconds and load it, serving the old ones
        meanwhile; a reload that fails is retried with backoff (twice the wait each failure in a row, at most
        BACKOFF_CAP intervals) until it loads."""
        wait = interval
        failures = 0
        while True:
            await asyncio.sleep(wait)
            try:
                await self._reload()
                wait, failures = interval, 0
            # A registry blip or a half-written expert must not take the replica down.
            except Exception as err:
                failures += 1
                wait = interval * min(2**failures, BACKOFF_CAP)
                self.stats.reload_failures += 1
                self.metrics.reload_failures.inc()
                logger.warning(
                    "keeping experts %s: reload failed (%d in a row), retried in %g s: %s",
                    self.experts.version,
                    failures,
                    wait,
                    err,
                )

    async def _reload(self) -> None:
        """Load the source's current version if it is not the one served."""
        version = await self.loop.run_in_executor(None, self.source.version)
        if version != self.experts.version:
            self.stats.reload_pending = version
            loaded = await self.loop.run_in_executor(None, self._load)
            # Requests resolved from now on use the new set; those submitted already keep their bank.
            self.experts, self.engine.bank = loaded, loaded.bank
            self.stats.reloads += 1
            logger.info("reloaded experts: version %s, %s", loaded.version, loaded.versions)
        self.stats.reload_pending = None
        if self.stats.last_good:  # the source answers again, and its set is served
            self._serving_last_good(False)

    def _load(self) -> ExpertSet:
        _injected_reload_fault()
        return self._index(self.source.load(self.base))

    async def catalogue(self) -> Catalogue:
        """The experts this replica serves, their versions, and the survey similarity table."""
        self.stats.calls["catalogue"] += 1
        experts = self.experts
        cards = [
            ExpertCard(
                culture=e.meta.culture,
                iso=e.meta.iso,
                version=experts.versions[e.meta.culture],
                descriptor=e.meta.descriptor,
                val_alignment=e.meta.training.get("val_alignment"),
                base_model=e.meta.base_model,
                prior_weight=e.meta.prior_weight,
            )
            for e in experts.experts
        ]
        return Catalogue(
            experts.version, cards, experts.similarity, self.base.name, self.base.fingerprint, experts.since
        )

    async def check_health(self) -> None:
        """Serve's health check: raises (EngineBroken) when the engine cannot step, so Serve replaces the replica."""
        self.engine.check_health()

    async def health(self) -> PoolHealth:
        """This replica's identity, batching counters and what its engine holds now."""
        self.stats.calls["health"] += 1
        context = serve.get_replica_context()
        engine = self.engine
        return PoolHealth(
            replica=context.replica_id.unique_id,
            pid=os.getpid(),
            experts_version=self.experts.version,
            uptime_s=round(time.time() - self.started, 1),
            **(vars(self.stats) | {"recent": list(self.stats.recent), "calls": dict(self.stats.calls)}),
            running_requests=engine.running,
            running_rows=engine.rows,
            waiting_requests=engine.waiting,
            engine_steps=engine.steps,
            finished=dict(engine.finished),
            cache=_cache_stats(engine),
        )

    # ---- requests ----

    async def opinion(self, job: OpinionJob) -> OpinionAnswer:
        """A committee's option distribution for one question (answered by the engine between decode steps)."""
        self.stats.calls["opinion"] += 1
        async with self._admitted():
            experts = self.experts
            members = self._members(experts, job.committee)
            question = _prepared(lambda: self._question(job, experts))
            future = _prepared(lambda: self.engine.submit_opinion(question, members, experts.bank))
            self.stats.requests += 1
        distribution = [float(p) for p in await asyncio.wrap_future(future)]  # cancelled with this task
        if not all(math.isfinite(p) for p in distribution):  # a broken expert: an error, never a NaN answer
            raise FloatingPointError("the committee's option distribution is not finite")
        return OpinionAnswer(distribution, self._versions(experts, job.committee), experts.version)

    async def generate(self, job: GenerateJob) -> GenerateAnswer:
        """A committee's joint continuations of one prompt (one per choice), whole."""
        self.stats.calls["generate"] += 1
        texts, counts, reasons = [""] * job.n, [0] * job.n, [""] * job.n
        logprobs = [[] if job.logprobs is not None else None for _ in range(job.n)]
        async for event in self._generation(job):
            if isinstance(event, GenerateStart):
                start = event
                continue
            texts[event.index] += event.text
            if isinstance(event, TokenPiece) and event.logprobs is not None:
                logprobs[event.index].append(event.logprobs)
            if isinstance(event, GenerateEnd):
                counts[event.index], reasons[event.index] = event.completion_tokens, event.finish_reason
        choices = [Choice(i, texts[i], reasons[i], counts[i], logprobs[i]) for i in range(job.n)]
        return GenerateAnswer(choices, start.prompt_tokens, start.versions, start.experts_version)

    async def stream(self, job: GenerateJob) -> AsyncIterator[GenerateStart | TokenPiece | GenerateEnd]:
        """A committee's joint continuations as they are decoded: a GenerateStart, then each choice's
        TokenPieces (one per token) and its GenerateEnd, the choices interleaved.

        Errors in the request itself (422, 409) are raised before the first event. Called with
        `handle.options(stream=True)`; cancelling the call (the client went away) cancels the request in the
        engine, whose rows leave the batch at its next step.
        """
        self.stats.calls["stream"] += 1
        async for event in self._generation(job):
            yield event

    async def _generation(self, job: GenerateJob) -> AsyncIterator[GenerateStart | TokenPiece | GenerateEnd]:
        async with self._admitted():
            experts = self.experts
            members = self._members(experts, job.committee)
            requests = _prepared(lambda: self._decode_requests(job, members, experts))
            choices = _prepared(lambda: _Choices(self.engine, requests, experts.bank))
            self.stats.requests += 1
        submitted = time.perf_counter()
        lead = max(job.committee.members, key=lambda m: m[1])[0]  # the TTFT series' expert
        texts = [_ChoiceText(self.base.tokenizer, job.stop) for _ in requests]
        try:
            yield GenerateStart(
                len(requests[0].prompt_ids), self._versions(experts, job.committee), experts.version
            )
            while choices.open:
                index, token = await choices.next()
                generation, text = choices.generations[index], texts[index]
                if token is None:  # the engine is done with this choice
                    choices.close(index)
                    # EngineStopped (shutdown): an error, never a partial 200.
                    if generation.error is not None:
                        raise generation.error
                    if generation.finish_reason not in ("stop", "length"):
                        raise EngineStopped(f"the generation ended as {generation.finish_reason}")
                    rest, reason = text.finish(generation.finish_reason)
                    yield GenerateEnd(reason, text.tokens, rest, index)
                    continue
                if choices.first_token:
                    self.metrics.first_token.observe(time.perf_counter() - submitted, tags={"expert": lead})
                logprobs = self._logprobs(generation, token, text) if job.logprobs is not None else None
                yield TokenPiece(token, text.add(token), index, logprobs)
                if text.stop.stopped:  # a stop string: the text ends before it, and the engine stops the rows
                    choices.close(index, "stop")
                    yield GenerateEnd("stop", text.tokens, "", index)
        finally:
            if choices.cancel():
                self.stats.closed_early += 1  # the caller went away: its choices still running are cancelled
            tokens = sum(t.tokens for t in texts)
            for culture in job.committee.cultures if tokens else []:
                self.metrics.tokens.inc(tokens, tags={"expert": culture})

    def _logprobs(self, generation: Generation, token: int, text: _ChoiceText) -> TokenLogprobs:
        """The engine's log probabilities of `token`, just taken, with the tokens' texts (from the tokenizer)."""
        entry = generation.logprobs[text.tokens]  # read before `text.add`: the token's index in its choice
        chosen = Candidate(*self._token_text(token), entry.logprob)
        top = [Candidate(*self._token_text(token), logprob) for token, logprob in entry.top]
        return TokenLogprobs(chosen, top, len(text.sent))

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        # Keyed by token id: bounded by the vocabulary, whatever the requests.
        if token not in self.token_texts:
            self.token_texts[token] = token_text(self.base.tokenizer, token)
        return self.token_texts[token]

    # ---- preparing a request ----

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """Around the block that prepares a request and submits it to the engine: nothing here.

        A subclass may make requests wait before they reach the engine (the serving tests' pool holds them at a
        gate, tests/serving.py).
        """
        yield

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
        self._check_fits(max(len(ids) for ids, _ in question.orders()), experts.bank, 0)
        return question

    def _decode_requests(
        self, job: GenerateJob, members: list[tuple[int, float]], experts: ExpertSet
    ) -> list[DecodeRequest]:
        """The job's `n` decode requests: one prompt, each choice with its own seed."""
        tokenizer = self.base.tokenizer
        text = chat_prompt(tokenizer, job.messages) if job.messages is not None else job.prompt
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self._check_fits(len(ids), experts.bank, job.max_new_tokens)
        return [
            DecodeRequest(
                ids,
                members,
                job.max_new_tokens,
                job.temperature,
                choice_seed(job.seed, i),
                top_p=job.top_p,
                logprobs=job.logprobs,
            )
            for i in range(job.n)
        ]

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


class _Choices:
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


class _ChoiceText:
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


def _cache_stats(engine: DecodeEngine) -> dict[str, int]:
    """The engine's cache slots, as PoolHealth.cache reports them."""
    used, needed = engine.cache_slots
    return {
        "budget": engine.max_cache_tokens,
        "used": used,
        "needed": needed,
        "peak": engine.peak_cache_slots,
        "slot_steps_used": engine.slot_steps_used,
        "slot_steps_needed": engine.slot_steps_needed,
    }


def _injected_reload_fault() -> None:
    """A fault hook: raise if $SHORES_RELOAD_FAULT names a file that exists and this replica owns.

    The first replica to reload after the file appears writes its pid into it, and owns it until it is removed:
    one replica's reloads fail while the others load (tests/test_serve_replicas.py, bench/serve_load.py). Like
    orchestrator/faults.py's $SHORES_FAULT, it does nothing unless the variable is set (docs/serving.md).
    """
    path = os.environ.get(RELOAD_FAULT_ENV)
    if not path:
        return
    try:
        fault = open(os.open(path, os.O_RDWR), "r+")  # never created here: removed, the fault is over
    except FileNotFoundError:
        return
    with fault:
        fcntl.flock(fault, fcntl.LOCK_EX)  # one owner, whichever replica comes first
        owner = fault.read().strip()
        if not owner:
            owner = str(os.getpid())
            fault.write(owner)
    if owner == str(os.getpid()):
        raise OSError(f"reload failed on purpose (${RELOAD_FAULT_ENV} {path})")


def _prepared(make: Callable[[], Answer]) -> Answer:
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
