"""What an expert was validated on: its survey file, its split, and its validation records, as a fingerprint.

Two experts' validation alignments compare only when they were measured on the same records. The fingerprint
says which: the file (path and content hash), the split (fractions, salt and any transfer split), and a hash
of the culture's validation records (question, options and answers). It travels in the expert's metadata and
as tags on its registered version, and holds enough to rebuild that validation split from the file to score
other experts on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.survey.loading import file_sha256, load_survey
from orchestrator.survey.pooling import pooled_records
from orchestrator.survey.records import SurveyDataError, SurveyRecord, normalise_question
from orchestrator.survey.splits import Transfer, split_records
from workers.cultures import SHARED

if TYPE_CHECKING:
    from orchestrator.survey.experiment_data import ExperimentData

TAG_PREFIX = "data."  # a registered version's tags: data.survey, data.sha256, data.split, ...


@dataclass(frozen=True)
class DataFingerprint:
    """Which survey file, which split, and which validation records an expert's validation alignment is on."""

    survey: str  # the file read, absolute
    sha256: str  # of the file's bytes
    split: tuple[float, float, float]  # train, val, test fractions
    split_salt: str
    val_records: str  # sha256 of the culture's validation records (question, options, answers), sorted
    val_questions: int
    # The programme held out of train/val/test (`Transfer.key`, e.g. "wvs:0.5"); "": none.
    transfer: str = ""

    def to_dict(self) -> dict:
        """The fingerprint as JSON-ready values (in an expert's metadata, under training["data"]); no transfer
        split writes no `transfer`, as before it existed."""
        values = asdict(self) | {"split": list(self.split)}
        return values if self.transfer else {k: v for k, v in values.items() if k != "transfer"}

    @classmethod
    def from_dict(cls, values: dict | None) -> DataFingerprint | None:
        """The fingerprint of `to_dict`, or None for an expert from before fingerprints."""
        if not values:
            return None
        return cls(**(values | {"split": tuple(float(f) for f in values["split"])}))

    def tags(self) -> dict[str, str]:
        """The fingerprint as a registered version's tags: `data.<field>`."""
        return {
            TAG_PREFIX + k: json.dumps(v) if isinstance(v, list) else str(v)
            for k, v in self.to_dict().items()
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> DataFingerprint | None:
        """The fingerprint a registered version's tags hold, or None (registered before fingerprints)."""
        values = {k[len(TAG_PREFIX) :]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
        if set(values) < {"survey", "sha256", "split", "split_salt", "val_records", "val_questions"}:
            return None
        return cls.from_dict(
            {
                "survey": values["survey"],
                "sha256": values["sha256"],
                "split": json.loads(values["split"]),
                "split_salt": values["split_salt"],
                "val_records": values["val_records"],
                "val_questions": int(values["val_questions"]),
                "transfer": values.get("transfer", ""),
            }
        )


def records_digest(records: Iterable[SurveyRecord]) -> str:
    """A hash of records' questions, options and answers, whatever their order and the questions' spacing."""
    lines = sorted(
        json.dumps([normalise_question(r.question), list(r.options), [round(x, 9) for x in r.distribution]])
        for r in records
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def data_fingerprint(data: ExperimentData, culture: str) -> DataFingerprint:
    """The fingerprint of one expert's data (a culture's or the shared prior's) in an experiment."""
    val = data.records_of("val", [culture])[culture]
    return DataFingerprint(
        survey=data.report.file,
        sha256=data.report.sha256,
        split=tuple(data.fractions),
        split_salt=data.salt,
        val_records=records_digest(val),
        val_questions=len(val),
        transfer=data.transfer.key() if data.transfer else "",
    )


def validation_records(fingerprint: DataFingerprint, culture: str) -> list[SurveyRecord]:
    """The validation records a fingerprint names, rebuilt from its file (SurveyDataError if they cannot be:
    the file is gone, or holds other bytes now)."""
    path = Path(fingerprint.survey)
    if not path.is_file():
        raise SurveyDataError(f"{path}: no such file")
    if file_sha256(path) != fingerprint.sha256:
        raise SurveyDataError(f"{path} has changed since the expert was trained on it")
    records, _ = load_survey(path)
    if culture == SHARED:  # the prior validates on every question's answers pooled over its countries
        records = pooled_records(records)
    val = [
        r
        for r in split_records(
            records, fingerprint.split, fingerprint.split_salt, Transfer.parse(fingerprint.transfer)
        )["val"]
        if r.culture == culture
    ]
    if (
        records_digest(val) != fingerprint.val_records
    ):  # another loader, say: not the records it was scored on
        raise SurveyDataError(
            f"{path}: the validation records of {culture} rebuilt from it are not the ones scored"
        )
    return val
