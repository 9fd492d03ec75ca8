"""ExpertPool: replicas that hold the frozen base and every expert, and batch requests across experts.

Serve's multiplexing (`@serve.multiplexed`) batches requests per model id only; here a request carries
its committee, so one `@serve.batch` gathers requests for any experts and each batch is one forward pass
(opinions) or one joint decode (free text), every row with its own expert's soft prompt. Experts come
from a directory or the MLflow registry and are reloaded, without a restart, when the source changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from orchestrator.config import ExperimentConfig
from orchestrator.experts import SIMILARITY_FILE, load_experts, slug
from workers.base_model import FrozenBase, load_frozen_base
from workers.committees import BASE, Committee, Similarity, committee_distributions, load_similarity
from workers.generation import DecodeRequest, chat_prompt, committee_generate, stop_token_ids
from workers.prompts import NO_EXPERT, Expert, SoftPromptBank, bank_from_experts
from workers.scoring import encode_question

logger = logging.getLogger("ray.serve")


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

    def catalogue(self) -> dict:
        """What the router needs to build committees, and what GET /v1/experts shows."""
        return {
            "version": self.version,
            "experts": [
                {
                    "culture": e.meta.culture,
                    "iso": e.meta.iso,
                    "version": self.versions[e.meta.culture],
                    "descriptor": e.meta.descriptor,
                    "val_alignment": e.meta.training.get("val_alignment"),
                    "base_model": e.meta.base_model,
                }
                for e in self.experts
            ],
            "similarity": self.similarity,
        }


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


class DirectorySource:
    """Experts in a directory (`shores train` writes <output_dir>/experts); the version is a cheap stat."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def version(self) -> str:
        files = sorted(self.directory.rglob("*.safetensors")) + [self.directory / SIMILARITY_FILE]
        stats = [(p, p.stat()) for p in files if p.exists()]
        return _digest([f"{p.relative_to(self.directory)} {s.st_size} {s.st_mtime_ns}" for p, s in stats])

    def load(self, base: FrozenBase) -> ExpertSet:
        version = self.version()
        experts = load_experts(self.directory, base)
        # An expert's version is its content, so the same prompt answers under the same name everywhere.
        versions = {}
        for path in self.directory.rglob("*.safetensors"):
            if path.name != "adapter_model.safetensors":
                versions[path.stem] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return ExpertSet(
            version,
            experts,
            {e.meta.culture: versions.get(slug(e.meta.culture), "?") for e in experts},
            load_similarity(self.directory / SIMILARITY_FILE),
        )


class RegistrySource:
    """Each culture's expert under a registry alias (`champion`), downloaded from MLflow when it moves."""

    def __init__(self, config: ExperimentConfig):
        from orchestrator.tracking import Store

        self.store = Store.from_config(config)
        self.alias = config.serve.registry_alias
        self.downloads = Path(config.output_dir) / "registry" / "serve"
        # Training writes survey similarity beside its experts, not into the registry.
        self.similarity_path = Path(config.serve.experts_dir or config.experts_dir) / SIMILARITY_FILE

    def _champions(self) -> dict[str, tuple[str, int]]:
        from orchestrator.tracking import registered_experts

        rows = registered_experts(self.store)
        return {r["culture"]: (r["model"], r["version"]) for r in rows if self.alias in r["aliases"]}

    def version(self) -> str:
        return self._version(self._champions())

    @staticmethod
    def _version(champions: dict[str, tuple[str, int]]) -> str:
        return _digest([f"{c} {m} {v}" for c, (m, v) in sorted(champions.items())])

    def load(self, base: FrozenBase) -> ExpertSet:
        from orchestrator.experts import ExpertsNotFoundError
        from orchestrator.tracking import download_champions

        self.downloads.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the alias may move during a download: take a set that did not change under us
            before = self._champions()
            if not before:
                raise ExpertsNotFoundError(f"no registered experts under the alias {self.alias!r}")
            folder = Path(tempfile.mkdtemp(prefix="experts-", dir=self.downloads))
            try:
                download_champions(self.store, folder, self.alias)
                experts = load_experts(folder, base)
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # the prompts are in memory now
            if self._champions() == before:
                break
        versions = {c: f"{m} v{v}" for c, (m, v) in before.items()}
        missing = [e.meta.culture for e in experts if e.meta.culture not in versions]
        if missing:
            raise ExpertsNotFoundError(
                f"downloaded experts {missing} are not registered under {self.alias!r}"
            )
        return ExpertSet(self._version(before), experts, versions, load_similarity(self.similarity_path))


def expert_source(config: ExperimentConfig) -> DirectorySource | RegistrySource:
    """Where this config's experts come from."""
    if config.serve.experts_source == "registry":
        return RegistrySource(config)
    return DirectorySource(Path(config.serve.experts_dir or config.experts_dir))


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


# A replica that cannot load its experts fails the same way every time: three tries, not Serve's twenty.
@serve.deployment(max_ongoing_requests=64, max_constructor_retry_count=3)
class ExpertPool:
    """One replica: the frozen base, every expert in one prompt bank, batched opinions and generation."""

    def __init__(self, config: ExperimentConfig):
        section = config.serve
        self.config = config
        self.started = time.time()
        self.base = load_frozen_base(
            config.base_model.name, config.base_model.dtype, config.base_model.device
        )
        self.stop_ids = stop_token_ids(self.base)
        self.source = expert_source(config)
        self.experts = self._index(self.source.load(self.base))
        self.stats = PoolStats()
        self.per_expert = section.batching == "per_expert"
        for handler in (self._opinion_batch, self._generate_batch):
            handler.set_max_batch_size(section.max_batch_size)
            handler.set_batch_wait_timeout_s(section.batch_wait_timeout_s)
        self.watcher = None
        if section.reload_interval_s > 0:
            self.watcher = asyncio.get_running_loop().create_task(self._watch(section.reload_interval_s))
        logger.info(
            "ExpertPool ready: %s with %d experts on %s",
            self.base.name,
            len(self.experts.experts),
            self.base.device,
        )

    def _index(self, loaded: ExpertSet) -> ExpertSet:
        loaded.bank = bank_from_experts(loaded.experts, self.base.device) if loaded.experts else None
        loaded.index = {e.meta.culture: i for i, e in enumerate(loaded.experts)}
        return loaded

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

    async def catalogue(self) -> dict:
        """The experts this replica serves, their versions, and the survey similarity table."""
        return self.experts.catalogue() | {"base_model": self.base.name, "fingerprint": self.base.fingerprint}

    async def health(self) -> dict:
        """This replica's identity and batching counters."""
        context = serve.get_replica_context()
        return {
            "replica": context.replica_id.unique_id,
            "pid": os.getpid(),
            "experts_version": self.experts.version,
            "uptime_s": round(time.time() - self.started, 1),
            **vars(self.stats),
            "recent": list(self.stats.recent),
        }

    async def opinion(self, job: OpinionJob) -> dict:
        """A committee's option distribution for one question (batched with concurrent requests)."""
        return await self._opinion_batch(job)

    async def generate(self, job: GenerateJob) -> dict:
        """A committee's joint continuation of one prompt (batched with concurrent requests)."""
        return await self._generate_batch(job)

    def _resolve(
        self, experts: ExpertSet, jobs: list
    ) -> tuple[list[int], list[list[tuple[int, float]]], dict]:
        """The jobs whose experts are all loaded, as bank indices; the others answer 409 (a reload raced)."""
        ok, members, errors = [], [], {}
        for i, job in enumerate(jobs):
            missing = [c for c in job.committee.cultures if c != BASE and c not in experts.index]
            if missing:
                errors[i] = {
                    "error": f"experts {missing} are not loaded here (reloading?); retry",
                    "status": 409,
                }
                continue
            ok.append(i)
            members.append(
                [(NO_EXPERT if c == BASE else experts.index[c], w) for c, w in job.committee.members]
            )
        return ok, members, errors

    def _answer(self, experts: ExpertSet, committee: Committee) -> dict:
        return {
            "versions": {c: experts.versions.get(c, "base") for c in committee.cultures},
            "experts_version": experts.version,
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _opinion_batch(self, jobs: list[OpinionJob]) -> list[dict]:
        experts = self.experts  # one version for the whole batch
        ok, members, results = self._resolve(experts, jobs)
        max_length = self.config.data.max_length

        questions = [
            encode_question(self.base.tokenizer, jobs[i].question, jobs[i].options, max_length=max_length)
            for i in ok
        ]
        # The model runs on the event loop, as in Serve's batching guide, and that is what fills batches:
        # Serve 2.60 forms the next batch while one runs, so with the model in a worker thread the loop
        # would cut many small batches meanwhile; blocked, it lets arrivals queue up into one full batch.
        distributions = (
            committee_distributions(self.base, experts.bank, questions, members, self.per_expert)
            if ok
            else []
        )
        self.stats.record([jobs[i] for i in ok], [jobs[i].committee for i in ok])
        for i, dist in zip(ok, distributions):
            results[i] = {"distribution": [float(p) for p in dist]} | self._answer(experts, jobs[i].committee)
        return [results[i] for i in range(len(jobs))]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[GenerateJob]) -> list[dict]:
        experts = self.experts
        ok, members, results = self._resolve(experts, jobs)
        tokenizer, max_length = self.base.tokenizer, self.config.data.max_length
        requests = []
        for i, m in zip(ok, members):
            job = jobs[i]
            text = chat_prompt(tokenizer, job.messages) if job.messages is not None else job.prompt
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids[-max_length:]  # a long prompt keeps its end
            requests.append(DecodeRequest(ids, m, job.max_new_tokens, job.temperature, job.seed))
        decoded = committee_generate(
            self.base, experts.bank, requests, self.stop_ids
        )  # on the loop: see above
        self.stats.record([jobs[i] for i in ok], [jobs[i].committee for i in ok])
        for i, request, out in zip(ok, requests, decoded):
            results[i] = {
                "text": tokenizer.decode(out.token_ids, skip_special_tokens=True),
                "finish_reason": out.finish_reason,
                "prompt_tokens": len(request.prompt_ids),
                "completion_tokens": len(out.token_ids),
            } | self._answer(experts, jobs[i].committee)
        return [results[i] for i in range(len(jobs))]
