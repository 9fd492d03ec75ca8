"""The transfer split: each question's survey programme from its coding, one programme held out of
train/val/test into transfer_val and transfer_test, and its place in the data fingerprint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.evaluate import evaluate_beside_transfer, served_committees
from orchestrator.gate import champion_gate
from orchestrator.report_view import format_table
from orchestrator.survey import (
    SPLITS,
    TRANSFER_SPLITS,
    SurveyDataError,
    SurveyRecord,
    Transfer,
    data_fingerprint,
    load_survey,
    normalise_question,
    options_programme,
    prepare_data,
    programme_counts,
    question_programmes,
    similarity_table,
    split_records,
    validation_records,
)
from orchestrator.survey.fingerprint import DataFingerprint
from orchestrator.survey.loading import scale_order
from orchestrator.tracking import report_metrics
from tests.conftest import OPINIONS, TINY_CONFIG, config_with, random_expert
from workers.base_model import load_frozen_base
from workers.cultures import SHARED


def rec(culture: str, question: str, options: tuple[str, ...]) -> SurveyRecord:
    return SurveyRecord(culture, "XX", question, options, tuple(1 / len(options) for _ in options))


def questions(records: list[SurveyRecord]) -> set[str]:
    return {normalise_question(r.question) for r in records}


@pytest.mark.parametrize(
    ("options", "programme"),
    [
        (("Yes", "No", "DK/Refused"), "pew"),
        (("Yes", "No", "dk/refused"), "pew"),
        (("Democratic form of government", "Strong leader", "Don't know/Refused"), "pew"),
        (("Yes", "No", "Don't know", "No answer"), "wvs"),
        (("Yes", "No", "Don\u2019t  Know"), "wvs"),  # a curly apostrophe, another case, two spaces
        (("Agree", "Disagree", "No answer/refused", "Missing; Not applicable for other reasons"), "wvs"),
        (("1", "2", "No answer", "Other missing; Multiple answers Mail (EVS)"), "wvs"),
        (("Increase", "Decrease", "Does not make a difference"), "unknown"),
        (("Yes", "No", "Other answer", "I do not know examples concerned"), "unknown"),
        (("Yes", "No", "DK/Refused", "Don't know"), "unknown"),  # both codings: neither programme's
    ],
)
def test_a_questions_programme_is_read_from_its_missing_codes(options, programme):
    assert options_programme(options) == programme


def test_a_question_has_one_programme_from_all_its_option_sets():
    # One question coded with and without DK/Refused (two waves): every record of it is Pew's.
    records = [
        rec("Germany", "Trade? ", ("Up", "Down")),
        rec("Japan", "trade?", ("Up", "Down", "DK/Refused")),
    ]
    assert question_programmes(records) == {"trade?": "pew"}


def test_the_survey_files_programmes():
    records, _ = load_survey(OPINIONS)
    # 1,118 usable questions (one question's records all sum to 0): counted in the report.
    assert programme_counts(records) == {"pew": 396, "wvs": 198, "unknown": 524}


def constructed() -> list[SurveyRecord]:
    out = []
    for i in range(60):
        options = [("Yes", "No", "DK/Refused"), ("Yes", "No", "Don't know", "No answer"), ("Yes", "No")][
            i % 3
        ]
        out += [rec(country, f"Question {i}?", options) for country in ("Germany", "Japan")]
    return out


def test_the_held_out_programme_is_on_the_transfer_side_only_and_no_question_is_on_two_sides():
    records = constructed()
    parts = split_records(records, transfer=Transfer("wvs"))
    assert set(parts) == set(SPLITS + TRANSFER_SPLITS)
    sides = {name: questions(part) for name, part in parts.items()}
    names = list(sides)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sides[a] & sides[b], (a, b)
    labels = question_programmes(records)
    transfer = sides["transfer_val"] | sides["transfer_test"]
    assert transfer == {q for q, p in labels.items() if p == "wvs"}
    assert sides["transfer_val"] and sides["transfer_test"]
    # Every country's answers to one question share its split.
    assert sum(len(p) for p in parts.values()) == len(records)


def test_without_a_transfer_the_splits_are_exactly_todays():
    records, _ = load_survey(OPINIONS)
    config = config_with()
    assert config.data.transfer is None
    data = prepare_data(config.data)
    assert data.splits == split_records(records, config.data.split, config.data.split_salt)
    assert set(data.splits) == set(SPLITS) and data.transfer is None
    # The other programmes' questions split as they do without a transfer.
    held = prepare_data(config_with("data.transfer.hold_out=wvs").data)
    for split in SPLITS:
        kept = [
            r
            for r in data.splits[split]
            if question_programmes(data.records)[normalise_question(r.question)] != "wvs"
        ]
        assert held.splits[split] == kept


def test_the_transfer_split_is_in_the_fingerprint_and_its_validation_split_rebuilds():
    plain = prepare_data(
        config_with("shared.enabled=true").data, shared=config_with("shared.enabled=true").shared
    )
    config = config_with("shared.enabled=true", "data.transfer.hold_out=wvs", "data.transfer.val=0.4")
    held = prepare_data(config.data, shared=config.shared)
    for culture in ("Germany", SHARED):
        ours, theirs = data_fingerprint(held, culture), data_fingerprint(plain, culture)
        assert ours.transfer == "wvs:0.4" and theirs.transfer == "" and ours != theirs
        assert "transfer" not in theirs.to_dict()  # a fingerprint without a transfer is written as before
        assert DataFingerprint.from_dict(ours.to_dict()) == ours
        assert DataFingerprint.from_tags(ours.tags()) == ours
        assert DataFingerprint.from_tags(theirs.tags()) == theirs
        assert validation_records(ours, culture) == held.records_of("val", [culture])[culture]
    # The prior never trains on the held-out programme either.
    wvs = {q for q, p in question_programmes(held.records).items() if p == "wvs"}
    assert wvs and not wvs & questions(held.records_of("train", [SHARED])[SHARED])
    assert wvs == questions(held.splits["transfer_val"] + held.splits["transfer_test"])


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["data.transfer.hold_out=gss"], "data.transfer.hold_out"),
        (["data.transfer.hold_out=wvs", "data.transfer.val=1"], "data.transfer.val"),
        (["data.transfer.val=0.3"], "data.transfer.hold_out"),
    ],
)
def test_a_bad_transfer_config_names_its_key(sets, expected):
    with pytest.raises(ConfigError, match=expected):
        config_with(*sets)


def test_a_transfer_spec_round_trips_and_refuses_nonsense():
    assert Transfer.parse(Transfer("pew", 0.25).key()) == Transfer("pew", 0.25)
    assert Transfer.parse("") is None
    with pytest.raises(SurveyDataError, match="hold_out"):
        Transfer("unknown")


def test_eval_reports_the_transfer_split_beside_the_test_split_from_transfer_records_only(
    llama_dir, tmp_path
):
    config = config_with("data.transfer.hold_out=wvs")
    data = prepare_data(config.data)
    # Every transfer_test answer made uniform: the section's `uniform` column is exactly 1 on those records
    # and on no others, so a single record read from elsewhere shows.
    flat = [
        replace(r, distribution=tuple(1 / len(r.options) for _ in r.options))
        for r in data.splits["transfer_test"]
    ]
    data = replace(data, splits=data.splits | {"transfer_test": flat})
    base = load_frozen_base(str(llama_dir), device="cpu")
    trained = data.selection.trained
    experts = [random_expert(base, c, 2, 0, seed) for seed, c in enumerate([SHARED, *trained])]
    cultures = trained + data.selection.held_out
    similarity = similarity_table(data.records, data.selection.held_out, trained)
    committees = served_committees(experts, similarity, k=2, temperature=0.05)

    report = evaluate_beside_transfer(
        base, experts, data, "test", cultures, committees=committees, n_bootstrap=20
    )
    section = report["transfer"]
    assert section["split"] == "transfer_test" and section["hold_out"] == "wvs" and report["split"] == "test"
    assert set(section) == {
        "hold_out",
        "split",
        "cultures",
        "overall",
        "held_out",
        "renderings",
        "worst_rendering",
    }
    for culture in cultures:
        row = section["cultures"][culture]
        assert row["n"] == len(data.records_of("transfer_test", [culture])[culture]) > 0
        assert row["uniform"] == pytest.approx(1.0)
        assert report["cultures"][culture]["uniform"] < 1  # the test split's own records
        assert row[SHARED] is not None and row["committee"] is not None
        paired = row["differences"]["expert-shared"]
        assert (paired is None) == (culture not in trained)
    pooled = section["overall"]["differences"]["expert-shared"]
    assert pooled["n"] == sum(section["cultures"][c]["n"] for c in trained)
    assert pooled["ci95"][0] <= pooled["mean"] <= pooled["ci95"][1]
    assert section["held_out"]["cultures"] == ["Canada"]
    table = format_table(report)
    assert (
        "transfer split: transfer_test (wvs questions" in table and table.count("overall (with experts)") == 2
    )
    # Without a transfer split there is no section; the split of the same role is what is beside it.
    plain = evaluate_beside_transfer(
        base, experts, replace(data, transfer=None), "val", cultures, n_bootstrap=20
    )
    assert "transfer" not in plain
    assert "transfer.uniform.overall" in report_metrics(report)


def test_the_gate_never_compares_stored_scores_across_a_transfer_split():
    fingerprint = DataFingerprint("/data.jsonl", "abc", (0.7, 0.15, 0.15), "", "same-records", 10)

    def version(number: int, stored: float, transfer: str) -> ModelVersion:
        tags = {"val_alignment": str(stored)} | replace(fingerprint, transfer=transfer).tags()
        return ModelVersion(
            "shores-germany", str(number), 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()]
        )

    rescored = []

    def rescore(challenger, champion):
        rescored.append((challenger.version, champion.version))
        return 0.4, 0.6

    # The same validation records and no transfer on either side: the stored scores decide, nothing re-scored.
    assert champion_gate(version(2, 0.9, ""), version(1, 0.5, ""), rescore).promote and not rescored
    verdict = champion_gate(version(2, 0.9, "wvs:0.5"), version(1, 0.5, ""), rescore)
    assert rescored == [("2", "1")] and not verdict.promote and verdict.rescored == (0.4, 0.6)


def test_eval_of_a_transfer_half_without_a_transfer_split_is_one_line_and_nonzero(tmp_path, capsys):
    sets = ["--set", "base_model.name=unused", "--set", f"data.path={OPINIONS}"]
    args = [
        "eval",
        "--config",
        str(TINY_CONFIG),
        *sets,
        "--split",
        "transfer_test",
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--split transfer_test needs" in error and "data.transfer.hold_out" in error
    assert not (tmp_path / "r.json").exists()


def test_a_numbered_scale_listed_out_of_order_is_read_in_numeric_order(tmp_path):
    # GlobalOpinionQA lists some 0-10 scales with the high anchor third; a respondent saw them in order.
    options = ["Not important at all", 1.0, "Very important", *[float(i) for i in range(2, 10)]]
    shares = [0.1, 0.2, 0.3] + [0.05] * 8
    row = {"country": "Brazil", "question": "How important?", "options": options, "distribution": shares}
    path = tmp_path / "scale.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (record,), _ = load_survey(path)
    assert record.options == ("Not important at all", *map(str, range(1, 10)), "Very important")
    assert record.distribution == pytest.approx((0.1, 0.2, *[0.05] * 8, 0.3))  # shares move with options
    # Options without a numbered scale keep their order.
    assert scale_order(["1", "2", "No answer", "Other missing"]) == [0, 1, 2, 3]
    assert scale_order(["Yes", "No", "DK/Refused"]) == [0, 1, 2]
