"""The champion gate: whether a registered challenger replaces its culture's champion, compared like with like.

Two experts compare only on the same base and prompt shape. Their stored validation alignments compare only
when measured on the same validation records (their data fingerprints, `orchestrator.survey.fingerprint`,
name the same ones); otherwise both experts are scored again on the challenger's validation split, rebuilt
from its survey file, and the decision follows those scores. A champion registered before fingerprints counts
as validated on other data. Training and `shores experts promote` decide through the same `champion_gate`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from orchestrator.encoding import encode
from orchestrator.survey import DataFingerprint, SurveyDataError, validation_records
from workers.base_model import FrozenBase
from workers.cultures import slug
from workers.expert_file import PromptMismatchError, load_expert
from workers.expert_store import Registry
from workers.prompts import bank_from_experts
from workers.scoring import mean_alignment

# Tags a champion and its challenger must share to be compared: the same base and the same prompt shape.
COMPATIBILITY_TAGS = ("base_fingerprint", "num_virtual_tokens", "hidden_size", "prefix_tokens")
# Tags a re-scored challenger gets: both scores on its validation split, and the champion it was scored with.
RESCORED_TAG, RESCORED_CHAMPION_TAG = "rescored.val_alignment", "rescored.champion"
RESCORED_CHAMPION_SCORE_TAG = "rescored.champion_val_alignment"


class RescoreError(ValueError):
    """Two experts could not be scored on the challenger's validation split (said in one line)."""


@dataclass(frozen=True)
class Verdict:
    """The gate's decision, why (when not simply the better stored score), and any scores it measured."""

    promote: bool
    note: str = ""
    rescored: tuple[float, float] | None = None  # (challenger, champion) on the challenger's validation split


# (challenger, champion) -> both experts' validation alignment on the challenger's validation split
Rescore = Callable[[ModelVersion, ModelVersion], tuple[float, float]]


def champion_gate(challenger: ModelVersion, champion: ModelVersion | None, rescore: Rescore) -> Verdict:
    """Whether `challenger` replaces `champion` (None: the culture has none), compared like with like."""
    if champion is None:
        return Verdict(True)
    # A champion from before deep prompts has no prefix_tokens tag: it had no prefix ("0").
    if any(champion.tags.get(k, "0") != challenger.tags.get(k, "0") for k in COMPATIBILITY_TAGS):
        return Verdict(
            False, f"not compared: champion v{champion.version} was trained on another base or prompt shape"
        )
    ours, theirs = DataFingerprint.from_tags(challenger.tags), DataFingerprint.from_tags(champion.tags)
    if ours is None:
        if theirs is None:  # both from before fingerprints: their stored scores are all there is
            return Verdict(stored_score(challenger) > stored_score(champion))
        return Verdict(
            False,
            f"not compared: v{challenger.version} has no data fingerprint, so champion v{champion.version} "
            "cannot be scored on its validation split",
        )
    # Stored scores compare only on the same validation records of the same split (a transfer split too).
    if theirs is not None and (theirs.val_records, theirs.transfer) == (ours.val_records, ours.transfer):
        return Verdict(stored_score(challenger) > stored_score(champion))
    try:
        mine, current = rescore(challenger, champion)
    except RescoreError as err:
        return Verdict(
            False, f"not compared: champion v{champion.version} was validated on other data; {err}"
        )
    note = (
        f"champion v{champion.version} was validated on other data: both re-scored on v{challenger.version}'s "
        f"validation split ({ours.val_questions} questions): v{challenger.version} {mine:.4f}, "
        f"champion v{champion.version} {current:.4f}"
    )
    return Verdict(mine > current, note, (mine, current))


def stored_score(version: ModelVersion) -> float:
    """A version's validation alignment as registered."""
    return float(version.tags.get("val_alignment", "-inf"))


class Rescorer:
    """Scores a challenger and a champion on the challenger's validation split, the base loaded once.

    Each pair is scored once (a compare-and-set may ask again); the scores go on the challenger's version
    as tags and on stdout as one line.
    """

    def __init__(self, registry: Registry, base: Callable[[], FrozenBase], max_length: int, batch_size: int):
        self.registry = registry
        self.load_base = base
        self.max_length = max_length
        self.batch_size = batch_size
        self._base: FrozenBase | None = None
        self._scores: dict[tuple[str, str, str], tuple[float, float]] = {}

    def __call__(self, challenger: ModelVersion, champion: ModelVersion) -> tuple[float, float]:
        key = (challenger.name, str(challenger.version), str(champion.version))
        if key not in self._scores:
            self._scores[key] = self._score(challenger, champion)
            self._log(challenger, champion, *self._scores[key])
        return self._scores[key]

    def _score(self, challenger: ModelVersion, champion: ModelVersion) -> tuple[float, float]:
        culture = challenger.tags.get("culture", "")
        try:
            records = validation_records(DataFingerprint.from_tags(challenger.tags), culture)
        except SurveyDataError as err:
            raise RescoreError(f"v{challenger.version}'s validation split cannot be rebuilt: {err}") from None
        if not records:
            raise RescoreError(f"v{challenger.version}'s validation split holds no records of {culture}")
        if self._base is None:
            self._base = self.load_base()
        base = self._base
        with tempfile.TemporaryDirectory() as tmp:
            try:
                experts = [
                    self._download(v, culture, base, Path(tmp) / str(v.version))
                    for v in (challenger, champion)
                ]
            except PromptMismatchError as err:
                raise RescoreError(f"the config's base model cannot score them ({err})") from None
        bank = bank_from_experts(experts, base.device)
        questions = encode(base, records, self.max_length)
        mine, current = (mean_alignment(base, bank, questions, i, self.batch_size) for i in range(2))
        return mine, current

    def _download(self, version: ModelVersion, culture: str, base: FrozenBase, folder: Path):
        import mlflow

        self.registry.call(
            f"download {version.name} v{version.version}",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(folder), tracking_uri=self.registry.tracking_uri
            ),
        )
        found = sorted(folder.rglob(f"{slug(culture)}.safetensors"))
        if not found:
            raise RescoreError(f"{version.name} v{version.version} holds no expert file for {culture}")
        return load_expert(found[0], base)

    def _log(self, challenger: ModelVersion, champion: ModelVersion, mine: float, current: float) -> None:
        tags = {
            RESCORED_TAG: f"{mine:.4f}",
            RESCORED_CHAMPION_TAG: str(champion.version),
            RESCORED_CHAMPION_SCORE_TAG: f"{current:.4f}",
        }
        client = self.registry.client()
        for key, value in tags.items():
            self.registry.call(
                f"tag {challenger.name} v{challenger.version}",
                lambda k=key, v=value: client.set_model_version_tag(
                    challenger.name, str(challenger.version), k, v
                ),
            )
        print(
            f"{challenger.name}: champion v{champion.version} was validated on other data; on v{challenger.version}'s "
            f"validation split: v{challenger.version} {mine:.4f}, champion v{champion.version} {current:.4f}",
            flush=True,
        )
