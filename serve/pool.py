"""ExpertPool: the deployment whose replicas hold the frozen base and every expert, and serve them through one
decode engine.

Serve's multiplexing (`@serve.multiplexed`) batches requests per model id only; here a request carries its
committee, and one continuous-batching engine a replica (`workers.engine.DecodeEngine`, on its own thread)
runs them all: generations join and leave the running batch between decode steps, opinions are answered
between steps, every row with its own expert's soft prompt. A request is resolved against one version of the
experts and prefilled with that version's bank, so a reload swaps banks between steps and no request fails or
mixes two versions. The experts and their reloads are serve/expert_set.py's; the counters and series,
serve/pool_metrics.py's; reading the engine's generations as a stream, serve/streams.py's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ray import serve

from serve.expert_set import ExpertSet, ExpertSets
from serve.pool_metrics import PoolMetrics, PoolStats, cache_stats
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
from serve.streams import ChoiceText, prepared
from workers.base_model import load_frozen_base
from workers.chat import chat_prompt
from workers.committees import BASE, Committee, member_indices
from workers.detokenize import token_text
from workers.engine import (
    Batch,
    Choices,
    DecodeEngine,
    DecodeRequest,
    EngineStopped,
    Generation,
    auto_cache_tokens,
    choice_seed,
    stop_token_ids,
)
from workers.expert_store import DirectorySource, RegistrySource
from workers.prompts import SoftPromptBank
from workers.scoring import EncodedQuestion, encode_question

logger = logging.getLogger("ray.serve")
WHOLE = 1 << 30  # encode the whole prompt: its length is checked against the context window, not cut


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
        self.expert_sets = ExpertSets(settings.source, self.base, self.stats, self.metrics)
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
        self.expert_sets.on_reload = self._use_bank
        self.engine.start()
        self.watcher = None
        if settings.reload_interval_s > 0:
            self.watcher = self.loop.create_task(self.expert_sets.watch(settings.reload_interval_s))
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

    @property
    def experts(self) -> ExpertSet:
        """The set of experts served now: a request resolves against the one it reads, whole."""
        return self.expert_sets.current

    def _use_bank(self, loaded: ExpertSet) -> None:
        # A reload: requests submitted from now on are prefilled with its bank; those submitted keep theirs.
        self.engine.bank = loaded.bank

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
            cache=cache_stats(engine),
        )

    # ---- requests ----

    async def opinion(self, job: OpinionJob) -> OpinionAnswer:
        """A committee's option distribution for one question (answered by the engine between decode steps)."""
        self.stats.calls["opinion"] += 1
        async with self._admitted():
            experts = self.experts
            members = self._members(experts, job.committee)
            question = prepared(lambda: self._question(job, experts))
            future = prepared(lambda: self.engine.submit_opinion(question, members, experts.bank))
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
            requests = prepared(lambda: self._decode_requests(job, members, experts))
            choices = prepared(lambda: Choices(self.engine, requests, experts.bank))
            self.stats.requests += 1
        submitted = time.perf_counter()
        lead = max(job.committee.members, key=lambda m: m[1])[0]  # the TTFT series' expert
        texts = [ChoiceText(self.base.tokenizer, job.stop) for _ in requests]
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

    def _logprobs(self, generation: Generation, token: int, text: ChoiceText) -> TokenLogprobs:
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
