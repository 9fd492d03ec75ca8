"""The expert store's read side: trained experts from a directory or an MLflow registry, and survey similarity.

Training writes one `<slug>.safetensors` a culture (plus a PEFT adapter) and `similarity.json` into a
directory, and registers each culture's best expert as a version of the model `<prefix>-<slug>`, with the
alias `champion` on the best. Evaluation and serving read them back through this module (serving without
importing the driver). The write side stays with the driver (`orchestrator/expert_bank.py`, `orchestrator/publish.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from workers.base_model import FrozenBase
from workers.cultures import slug
from workers.defaults import CHAMPION
from workers.expert_file import Expert, load_expert

T = TypeVar("T")
SIMILARITY_FILE = "similarity.json"
PEFT_WEIGHTS = "adapter_model.safetensors"  # inside a PEFT adapter folder; not an expert file
LAST_GOOD = "last-good"  # a registry source's local copy of the set it last loaded, beside its downloads
Similarity = dict[str, dict[str, float]]  # culture -> {expert culture: survey similarity}


class ExpertsNotFoundError(ValueError):
    """No usable experts where some were expected."""


class RegistryError(RuntimeError):
    """The MLflow registry could not be read after every retry."""


# --------------------------------------------------------------------------------------------------------
# A directory of experts
# --------------------------------------------------------------------------------------------------------


def expert_files(directory: Path) -> list[Path]:
    """Every expert file under a directory, sorted (registry downloads nest one folder a culture)."""
    return sorted(p for p in Path(directory).rglob("*.safetensors") if p.name != PEFT_WEIGHTS)


def load_experts(directory: Path, base: FrozenBase | None = None) -> list[Expert]:
    """Every expert in a directory, sorted by culture; each checked against the base model."""
    paths = expert_files(directory)
    if not paths:
        raise ExpertsNotFoundError(f"no experts (*.safetensors) in {directory}; train some first")
    return sorted((load_expert(p, base) for p in paths), key=lambda e: e.meta.culture)


def load_similarity(path: Path) -> Similarity:
    """The survey similarity table written beside the experts at training ({} where there is none)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------------------------------------
# The MLflow registry
# --------------------------------------------------------------------------------------------------------


class MlflowSettings(Protocol):
    """The MLflow settings of an experiment config (its `mlflow` section) that reading the registry needs."""

    tracking_uri: str | None
    registry_prefix: str
    retries: int


REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*)(?::[^/@\s]*)?@")


def redact(text: str) -> str:
    """`text` with the password of every URI in it (the whole user part if no password) replaced by ***."""

    def hide(m: re.Match) -> str:
        has_password = m.group(0).count(":") > 1
        user = f"{m['user']}:{REDACTED}" if has_password and m["user"] else REDACTED
        return f"{m['scheme']}{user}@"

    return _USERINFO.sub(hide, text)


@dataclass(frozen=True)
class Registry:
    """An MLflow model registry holding one registered model a culture, named `<registry_prefix>-<slug>`."""

    tracking_uri: str = field(repr=False)  # may hold credentials: print `uri` instead
    registry_prefix: str = "shores"
    retries: int = 3
    error = RegistryError  # what `call` raises when MLflow stays unreachable

    @property
    def uri(self) -> str:
        """The tracking URI without its credentials, to print."""
        return redact(self.tracking_uri)

    @classmethod
    def of_experiment(cls, output_dir: str | Path, mlflow: MlflowSettings) -> Registry:
        """An experiment's registry: the config's tracking URI, else the sqlite store training writes there."""
        uri = mlflow.tracking_uri or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
        return cls(uri, mlflow.registry_prefix, mlflow.retries)

    def client(self):  # -> mlflow.MlflowClient; mlflow is imported only where a registry is read
        """A client on this registry, with HTTP retries short enough that ours say what failed."""
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one MLflow call, retrying with backoff; raise RegistryError naming `what` if it never works."""
        from mlflow.exceptions import MlflowException

        delay = 0.5
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except (MlflowException, OSError, ConnectionError) as err:
                if attempt == self.retries:
                    # MLflow's messages repeat the request URL, credentials included.
                    raise self.error(
                        redact(f"MLflow at {self.tracking_uri} failed to {what}: {err}")
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def model_name(self, culture: str) -> str:
        """The registered model that holds a culture's experts."""
        return f"{self.registry_prefix}-{slug(culture)}"


def _every_page(registry: Registry, what: str, search: Callable[[str | None], list]) -> list:
    # MLflow's searches return one page (100 registered models by default) and a token for the next.
    items, token = [], None
    while True:
        page = registry.call(what, lambda t=token: search(t))
        items.extend(page)
        token = page.token
        if not token:
            return items


def registered_experts(registry: Registry, page_size: int = 100) -> list[dict]:
    """Every registered expert version: culture, model, version, aliases, alignment, fingerprint, run id."""
    client = registry.client()
    prefix = f"{registry.registry_prefix}-"
    found = _every_page(
        registry,
        "list models",
        lambda token: client.search_registered_models(
            f"name LIKE '{prefix}%'", max_results=page_size, page_token=token
        ),
    )
    # LIKE reads `_` and `%` in the prefix as wildcards (and MLflow's filter has no ESCAPE): it only narrows
    # the search, and the prefix itself is matched here, literally.
    models = [m for m in found if m.name.startswith(prefix)]
    rows = []
    for model in models:
        versions = _every_page(
            registry,
            "list versions",
            lambda token, m=model: client.search_model_versions(
                f"name = '{m.name}'", max_results=page_size, page_token=token
            ),
        )
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(versions, key=lambda v: int(v.version)):
            rows.append(
                {
                    "culture": v.tags.get("culture", model.name),
                    "model": model.name,
                    "version": int(v.version),
                    "aliases": aliases.get(str(v.version), []),
                    "val_alignment": float(v.tags.get("val_alignment", "nan")),
                    "base_fingerprint": v.tags.get("base_fingerprint", ""),
                    "run_id": v.run_id,
                }
            )
    return rows


def download_champions(registry: Registry, directory: Path, alias: str = CHAMPION) -> Path:
    """Download every culture's expert under `alias` into one local experts directory."""
    import mlflow

    directory.mkdir(parents=True, exist_ok=True)
    names = sorted({row["model"] for row in registered_experts(registry) if alias in row["aliases"]})
    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    for name in names:
        registry.call(
            f"download {name}@{alias}",
            lambda n=name: mlflow.artifacts.download_artifacts(
                f"models:/{n}@{alias}", dst_path=str(directory)
            ),
        )
    return directory


# --------------------------------------------------------------------------------------------------------
# Sources: where a server's experts come from, and which version of them is current
# --------------------------------------------------------------------------------------------------------


@dataclass
class ExpertSnapshot:
    """One loaded version of the experts, with the version of each and the similarity table beside them."""

    version: str
    experts: list[Expert]
    versions: dict[str, str]  # culture -> the version of its expert
    similarity: Similarity
    # When the set was taken from its source (a last-good copy keeps its own): orders two sets by age.
    since: float = field(default_factory=time.time)


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DirectorySource:
    """Experts in a directory (`shores train` writes <output_dir>/experts); the version is a cheap stat."""

    directory: Path

    def version(self) -> str:
        """A digest of the folder a published link points at, and its files' names, sizes and times."""
        files = sorted(Path(self.directory).rglob("*.safetensors")) + [self.directory / SIMILARITY_FILE]
        stats = [(p, p.stat()) for p in files if p.exists()]
        # The link's target: a new set is a new version even where it holds copies of the same files.
        target = os.path.realpath(self.directory)
        return _digest(
            [target] + [f"{p.relative_to(self.directory)} {s.st_size} {s.st_mtime_ns}" for p, s in stats]
        )

    def last_good(self, base: FrozenBase) -> ExpertSnapshot | None:
        """None: a directory is its own copy, nothing is kept apart."""
        return None

    def load(self, base: FrozenBase) -> ExpertSnapshot:
        """The experts now in the directory, checked against the base model."""
        version = self.version()
        experts = load_experts(self.directory, base)
        # An expert's version is its content, so the same prompt answers under the same name everywhere.
        versions = {
            path.stem: "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for path in expert_files(self.directory)
        }
        return ExpertSnapshot(
            version,
            experts,
            {e.meta.culture: versions.get(slug(e.meta.culture), "?") for e in experts},
            load_similarity(self.directory / SIMILARITY_FILE),
        )


@dataclass(frozen=True)
class RegistrySource:
    """Each culture's expert under a registry alias (`champion`), downloaded from MLflow when it moves."""

    registry: Registry
    alias: str
    downloads: Path  # downloads, and the last good copy (the prompts live in memory once loaded)
    similarity_path: Path  # training writes survey similarity beside its experts, not into the registry

    def champions(self) -> dict[str, tuple[str, int]]:
        """Culture -> (registered model, version) of every expert under the alias."""
        rows = registered_experts(self.registry)
        return {r["culture"]: (r["model"], r["version"]) for r in rows if self.alias in r["aliases"]}

    def version(self) -> str:
        """A digest of which version of which model holds the alias, for every culture."""
        return self._version(self.champions())

    @staticmethod
    def _version(champions: dict[str, tuple[str, int]]) -> str:
        return _digest([f"{c} {m} {v}" for c, (m, v) in sorted(champions.items())])

    def load(self, base: FrozenBase) -> ExpertSnapshot:
        """Download and load the experts under the alias, as one consistent set; keep its files as the last
        good copy."""
        self.downloads.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the alias may move during a download: take a set that did not change under us
            before = self.champions()
            if not before:
                raise ExpertsNotFoundError(f"no registered experts under the alias {self.alias!r}")
            folder = Path(tempfile.mkdtemp(prefix="experts-", dir=self.downloads))
            try:
                download_champions(self.registry, folder, self.alias)
                experts = load_experts(folder, base)
                stable = self.champions() == before
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            if stable:
                break
            shutil.rmtree(folder, ignore_errors=True)
        versions = {c: f"{m} v{v}" for c, (m, v) in before.items()}
        missing = [e.meta.culture for e in experts if e.meta.culture not in versions]
        if missing:
            shutil.rmtree(folder, ignore_errors=True)
            raise ExpertsNotFoundError(
                f"downloaded experts {missing} are not registered under {self.alias!r}"
            )
        snapshot = ExpertSnapshot(
            self._version(before), experts, versions, load_similarity(self.similarity_path)
        )
        self._keep(folder, snapshot)
        return snapshot

    def _keep(self, folder: Path, snapshot: ExpertSnapshot) -> None:
        """Make `folder` (the set just loaded) the last good copy: a folder per version, and a manifest
        replaced atomically; older copies are removed."""
        kept = self.downloads / f"{LAST_GOOD}-{snapshot.version}"
        try:
            folder.rename(kept)
        except OSError:  # another replica kept this version already
            shutil.rmtree(folder, ignore_errors=True)
        manifest = {
            "version": snapshot.version,
            "versions": snapshot.versions,
            "since": snapshot.since,
            "folder": kept.name,
        }
        partial = self.downloads / f".{LAST_GOOD}-{os.getpid()}.json"
        partial.write_text(json.dumps(manifest))
        os.replace(partial, self.downloads / f"{LAST_GOOD}.json")
        for old in self.downloads.glob(f"{LAST_GOOD}-*"):
            if old.is_dir() and old != kept:
                shutil.rmtree(old, ignore_errors=True)

    def has_last_good(self) -> bool:
        """Whether a set loaded from the registry was kept as the last good copy."""
        return (self.downloads / f"{LAST_GOOD}.json").exists()

    def last_good(self, base: FrozenBase) -> ExpertSnapshot | None:
        """The set last loaded from the registry, read from its local copy (None if there is none): what a
        replica starts from while MLflow cannot be read."""
        if not self.has_last_good():
            return None
        kept = json.loads((self.downloads / f"{LAST_GOOD}.json").read_text())
        experts = load_experts(self.downloads / kept["folder"], base)
        similarity = load_similarity(self.similarity_path)
        return ExpertSnapshot(kept["version"], experts, kept["versions"], similarity, kept["since"])
