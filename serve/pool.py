"""ExpertPool: replicas that hold the frozen base and every expert, and batch requests across experts.

Serve's multiplexing (`@serve.multiplexed`) batches requests per model id only; here a request carries
its committee, so one `@serve.batch` gathers requests for any experts and each batch is one forward pass
(opinions) or one joint decode (free text), every row with its own expert's soft prompt. Experts come
from a directory or the MLflow registry and are reloaded, without a restart, when the source changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TypeVar

import ray
from ray import serve
from ray.serve.metrics import Counter, Histogram

from workers.base_model import load_frozen_base
from workers.committees import BASE, Committee, committee_distributions
from workers.expert_store import DirectorySource, ExpertSnapshot, RegistrySource, Similarity
from workers.generation import DecodeRequest, chat_prompt, committee_generate, stop_token_ids
from workers.prompts import NO_EXPERT, Expert, SoftPromptBank, bank_from_experts
from workers.scoring import encode_question

logger = logging.getLogger("ray.serve")
# Names an actor that each request waits at before it is batched: tests hold the pool busy at that point.
GATE_ENV = "SHORES_POOL_GATE"
GATE_NAMESPACE = "shores"
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
class PoolHealth:
    """A replica's identity and batching counters (GET /healthz)."""

    replica: str
    pid: int
    experts_version: str
    uptime_s: float
    batches: int
    requests: int
    rows: int
    largest_batch: int
    most_experts_in_a_batch: int
    reloads: int
    recent: list[dict]


@dataclass(frozen=True)
class PoolSettings:
    """What a replica uses from the experiment config (serve/app.py builds it): model, experts, batching."""

    base_model: str
    dtype: str
    device: str
    source: DirectorySource | RegistrySource
    max_batch_size: int
    batch_wait_timeout_s: float
    per_expert: bool  # one forward pass per expert instead of mixed batches (benchmarks)
    reload_interval_s: float  # 0: never look for new experts


class PoolStats:
    """Counters that show batching at work (GET /healthz reports them)."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.largest_batch = 0
        self.most_experts_in_a_batch = 0
        self.reloads = 0
        self.recent: deque[dict] = deque(maxlen=16)  # the last batches: how many requests, which experts

    def record(self, jobs: list, committees: list[Committee]) -> None:
        self.batches += 1
        self.requests += len(jobs)
        self.rows += sum(len(c.members) for c in committees)
        self.largest_batch = max(self.largest_batch, len(jobs))
        distinct = {culture for c in committees for culture in c.cultures}
        self.most_experts_in_a_batch = max(self.most_experts_in_a_batch, len(distinct))
        self.recent.append({"requests": len(jobs), "experts": sorted(distinct)})


class PoolMetrics:
    """The pool's series on Ray's Prometheus endpoint: rows and experts a batch, tokens generated an expert."""

    def __init__(self) -> None:
        sizes = [1, 2, 4, 8, 16, 32, 64, 128]
        self.batch_rows = Histogram(
            "shores_batch_rows", "Rows (committee members) in one batch", sizes, tag_keys=("kind",)
        )
        self.batch_experts = Histogram(
            "shores_batch_experts", "Distinct experts in one batch", sizes, tag_keys=("kind",)
        )
        self.tokens = Counter("shores_generated_tokens", "Tokens generated, by expert", tag_keys=("expert",))

    def batch(self, kind: str, committees: list[Committee]) -> None:
        if committees:
            experts = {culture for c in committees for culture in c.cultures}
            self.batch_rows.observe(sum(len(c.members) for c in committees), tags={"kind": kind})
            self.batch_experts.observe(len(experts), tags={"kind": kind})


# A replica that cannot load its experts fails the same way every time: three tries, not Serve's twenty.
@serve.deployment(max_ongoing_requests=64, max_constructor_retry_count=3)
class ExpertPool:
    """One replica: the frozen base, every expert in one prompt bank, batched opinions and generation."""

    def __init__(self, settings: PoolSettings):
        self.settings = settings
        self.started = time.time()
        self.base = load_frozen_base(settings.base_model, settings.dtype, settings.device)
        self.stop_ids = stop_token_ids(self.base)
        self.context_window = getattr(self.base.model.config, "max_position_embeddings", None)
        self.gate = os.environ.get(GATE_ENV)
        self.source = settings.source
        self.experts = self._index(self.source.load(self.base))
        self.stats = PoolStats()
        self.metrics = PoolMetrics()
        for handler in (self._opinion_batch, self._generate_batch):
            handler.set_max_batch_size(settings.max_batch_size)
            handler.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.watcher = None
        if settings.reload_interval_s > 0:
            self.watcher = asyncio.get_running_loop().create_task(self._watch(settings.reload_interval_s))
        logger.info(
            "ExpertPool ready: %s with %d experts on %s",
            self.base.name,
            len(self.experts.experts),
            self.base.device,
        )

    def _index(self, loaded: ExpertSnapshot) -> ExpertSet:
        bank = bank_from_experts(loaded.experts, self.base.device) if loaded.experts else None
        index = {e.meta.culture: i for i, e in enumerate(loaded.experts)}
        return ExpertSet(loaded.version, loaded.experts, loaded.versions, loaded.similarity, bank, index)

    async def _watch(self, interval: float) -> None:
        """Look for a new version of the experts every `interval` seconds; keep serving the old ones meanwhile."""
        loop = asyncio.get_running_loop()
        failed = None
        while True:
            await asyncio.sleep(interval)
            version = None
            try:
                version = await loop.run_in_executor(None, self.source.version)
                if version in (self.experts.version, failed):
                    continue
                loaded = await loop.run_in_executor(None, lambda: self._index(self.source.load(self.base)))
                self.experts, failed = loaded, None
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
        """This replica's identity and batching counters."""
        context = serve.get_replica_context()
        return PoolHealth(
            replica=context.replica_id.unique_id,
            pid=os.getpid(),
            experts_version=self.experts.version,
            uptime_s=round(time.time() - self.started, 1),
            **(vars(self.stats) | {"recent": list(self.stats.recent)}),
        )

    async def opinion(self, job: OpinionJob) -> OpinionAnswer:
        """A committee's option distribution for one question (batched with concurrent requests)."""
        await self._pass_gate()
        return _raised(await self._opinion_batch(job))

    async def generate(self, job: GenerateJob) -> GenerateAnswer:
        """A committee's joint continuation of one prompt (batched with concurrent requests)."""
        await self._pass_gate()
        return _raised(await self._generate_batch(job))

    def _resolve(
        self, experts: ExpertSet, jobs: list
    ) -> tuple[list[int], list[list[tuple[int, float]]], dict[int, ExpertsNotLoadedError]]:
        """The jobs whose experts are all loaded, as bank indices; the others fail alone (a reload raced)."""
        ok, members, refused = [], [], {}
        for i, job in enumerate(jobs):
            missing = [c for c in job.committee.cultures if c != BASE and c not in experts.index]
            if missing:
                refused[i] = ExpertsNotLoadedError(
                    f"experts {missing} are not loaded here (reloading?); retry"
                )
                continue
            ok.append(i)
            members.append(
                [(NO_EXPERT if c == BASE else experts.index[c], w) for c, w in job.committee.members]
            )
        return ok, members, refused

    async def _pass_gate(self) -> None:
        """Wait at the gate actor named by $SHORES_POOL_GATE while it exists (tests: the pool held busy)."""
        if not self.gate:
            return
        try:
            gate = ray.get_actor(self.gate, namespace=GATE_NAMESPACE)
        except ValueError:  # no gate up: batches run
            return
        passage = gate.passage.remote()
        try:
            await passage
        except asyncio.CancelledError:  # the router gave up on this request: leave the gate too
            ray.cancel(passage)
            raise

    def _check_fits(self, prompt_tokens: int, experts: ExpertSet, max_new_tokens: int) -> None:
        """A BadRequestError (422) when the prompt, soft prompt and new tokens overrun the context window."""
        if self.context_window is None:
            return
        virtual = experts.bank.num_virtual_tokens if experts.bank is not None else 0
        limit = self.context_window - virtual - max_new_tokens
        if prompt_tokens > limit:
            raise BadRequestError(
                f"the prompt is {prompt_tokens} tokens, over the limit of {limit}: the context window of "
                f"{self.context_window} less {virtual} soft-prompt tokens and {max_new_tokens} new tokens"
            )

    @staticmethod
    def _versions(experts: ExpertSet, committee: Committee) -> dict[str, str]:
        return {c: experts.versions.get(c, "base") for c in committee.cultures}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _opinion_batch(self, jobs: list[OpinionJob]) -> list[OpinionAnswer | ExpertsNotLoadedError]:
        experts = self.experts  # one version for the whole batch
        resolved, resolved_members, results = self._resolve(experts, jobs)
        ok, members, questions = [], [], []
        for i, m in zip(resolved, resolved_members):
            try:  # each request is prepared alone: a bad one fails by itself, never its neighbours
                question = encode_question(
                    self.base.tokenizer, jobs[i].question, jobs[i].options, max_length=WHOLE
                )
                self._check_fits(len(question.input_ids), experts, 0)
                questions.append(question)
            except Exception as err:
                results[i] = _failed(err)
                continue
            ok.append(i)
            members.append(m)
        # The model runs on the event loop, as in Serve's batching guide, and that is what fills batches:
        # Serve 2.60 forms the next batch while one runs, so with the model in a worker thread the loop
        # would cut many small batches meanwhile; blocked, it lets arrivals queue up into one full batch.
        distributions = (
            committee_distributions(self.base, experts.bank, questions, members, self.settings.per_expert)
            if ok
            else []
        )
        self.stats.record([jobs[i] for i in ok], [jobs[i].committee for i in ok])
        self.metrics.batch("opinion", [jobs[i].committee for i in ok])
        for i, dist in zip(ok, distributions):
            results[i] = OpinionAnswer(
                [float(p) for p in dist], self._versions(experts, jobs[i].committee), experts.version
            )
        return [results[i] for i in range(len(jobs))]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[GenerateJob]) -> list[GenerateAnswer | ExpertsNotLoadedError]:
        experts = self.experts
        resolved, members, results = self._resolve(experts, jobs)
        tokenizer = self.base.tokenizer
        ok, requests = [], []
        for i, m in zip(resolved, members):
            job = jobs[i]
            try:  # each request is prepared alone: a bad one fails by itself, never its neighbours
                text = chat_prompt(tokenizer, job.messages) if job.messages is not None else job.prompt
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                self._check_fits(len(ids), experts, job.max_new_tokens)
                requests.append(DecodeRequest(ids, m, job.max_new_tokens, job.temperature, job.seed))
            except Exception as err:
                results[i] = _failed(err)
                continue
            ok.append(i)
        decoded = (
            committee_generate(self.base, experts.bank, requests, self.stop_ids) if requests else []
        )  # on the loop: see above
        self.stats.record([jobs[i] for i in ok], [jobs[i].committee for i in ok])
        self.metrics.batch("generate", [jobs[i].committee for i in ok])
        for i, request, out in zip(ok, requests, decoded):
            for culture in jobs[i].committee.cultures:
                self.metrics.tokens.inc(len(out.token_ids), tags={"expert": culture})
            results[i] = GenerateAnswer(
                text=tokenizer.decode(out.token_ids, skip_special_tokens=True),
                finish_reason=out.finish_reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=len(out.token_ids),
                versions=self._versions(experts, jobs[i].committee),
                experts_version=experts.version,
            )
        return [results[i] for i in range(len(jobs))]


Answer = TypeVar("Answer")


def _raised(result: Answer | Exception) -> Answer:
    # A batch answers each job alone; a failed one is raised to its own caller only.
    if isinstance(result, Exception):
        raise result
    return result


def _failed(err: Exception) -> Exception:
    # The client's fault (BadRequestError, or a value workers refuse) is a 422; anything else stays an internal error.
    if isinstance(err, ValueError) and not isinstance(err, BadRequestError):
        return BadRequestError(str(err))
    if not isinstance(err, BadRequestError):
        logger.exception("a request failed while being prepared")
    return err
