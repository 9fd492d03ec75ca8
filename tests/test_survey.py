"""Tests for orchestrator.survey: loading, splits, culture selection, similarity and the pooled prior's records
(names: test_cultures.py)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DataSection
from orchestrator.survey import (
    LoadReport,
    SurveyDataError,
    SurveyRecord,
    culture_similarity,
    foreign_data,
    load_survey,
    nearest_cultures,
    normalise_question,
    prepare_data,
    present_cultures,
    question_split,
    select_cultures,
    similarity_table,
    split_records,
)
from orchestrator.survey.pooling import pooled_records, sample_questions
from tests.conftest import config_with
from workers.cultures import SHARED, UnknownCultureError

GOQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "goqa"
OPINIONS = GOQA / "opinions.jsonl"
SAMPLE_CSV = GOQA / "format-sample.csv"

needs_data = pytest.mark.skipif(not OPINIONS.exists(), reason=f"shared survey data not at {GOQA}")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    # json.dumps writes NaN/Infinity tokens, which json.loads reads back: the loader must catch them.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def row(country: str, question: str = "Q1?", options=("A", "B"), distribution=(0.5, 0.5)) -> dict:
    return {
        "country": country,
        "question": question,
        "options": list(options),
        "distribution": list(distribution),
    }


def rec(culture: str, question: str, distribution: tuple[float, ...], options=None) -> SurveyRecord:
    options = options or tuple(f"o{i}" for i in range(len(distribution)))
    return SurveyRecord(culture, "XX", question, tuple(options), distribution)


@pytest.fixture(scope="module")
def real() -> tuple[list[SurveyRecord], LoadReport]:
    if not OPINIONS.exists():
        pytest.skip(f"shared survey data not at {GOQA}")
    return load_survey(OPINIONS)


# ---------------------------------------------------------------------------------------------------------
# Loading the shared data
# ---------------------------------------------------------------------------------------------------------


@needs_data
def test_real_file_counts(real):
    records, report = real
    assert report.read == 3880
    assert report.skipped["zero_sum"] == 9
    assert report.skipped.get("unknown_country", 0) == 0
    assert report.skipped.get("malformed", 0) == 0
    # Six questions were asked of both a national and a non-national sample of one country.
    assert report.skipped == {"zero_sum": 9, "duplicate": 6}
    assert report.kept == len(records) == 3880 - 15
    assert report.summary() == "read 3880 records, kept 3865, skipped 15 (zero_sum 9, duplicate 6)"
    assert report.path == str(OPINIONS)


@needs_data
def test_real_file_records_are_clean(real):
    records, _ = real
    cultures = {r.culture for r in records}
    assert not any("sample" in c.lower() for c in cultures)
    for spelling in ("Britain", "Great Britain", "S. Korea", "Czech Rep.", "Palest. ter.", "Taiwan ROC"):
        assert spelling not in cultures
    assert {"United Kingdom", "South Korea", "Czechia", "Palestine", "Taiwan", "India", "Russia"} <= cultures
    assert all(len(r.iso) == 2 and r.iso.isupper() for r in records)
    assert all(math.isclose(sum(r.distribution), 1.0, abs_tol=1e-9) for r in records)
    assert all(len(r.options) == len(r.distribution) >= 2 for r in records)
    # Some scale points are stored as floats (1.0, 2.0, ...); they come back as the text a respondent saw.
    assert all(isinstance(o, str) for r in records for o in r.options)
    assert any(r.options[:3] == ("Not important at all", "1", "2") for r in records)
    keys = Counter((r.culture, normalise_question(r.question), r.options) for r in records)
    assert max(keys.values()) == 1


@needs_data
def test_real_file_prefers_national_sample(real):
    records, _ = real
    raw = [json.loads(line) for line in OPINIONS.read_text(encoding="utf-8").splitlines()]
    mali = [r for r in raw if r["country"].startswith("Mali") and "honest election" in r["question"]]
    assert {r["country"] for r in mali} == {"Mali", "Mali (Non-national sample)"}
    national = next(r for r in mali if r["country"] == "Mali")
    kept = [r for r in records if r.culture == "Mali" and "honest election" in r.question]
    assert len(kept) == 1
    assert kept[0].distribution == pytest.approx(national["distribution"], abs=1e-9)


@needs_data
def test_sample_csv():
    records, report = load_survey(SAMPLE_CSV)
    assert report.read == 7
    assert report.skipped == {"zero_sum": 1}
    assert [r.culture for r in records] == ["Nigeria", "Japan", "Germany", "Egypt", "Brazil", "Mexico"]
    assert "Sweden" not in {r.culture for r in records}
    germany = records[2]
    assert germany.options == ("1", "2", "3", "4")
    assert germany.distribution == pytest.approx((0.02, 0.05, 0.28, 0.65))
    mexico = records[-1]
    assert mexico.options[-1] == "Don't know"
    assert sum(mexico.distribution) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# Loading synthetic files
# ---------------------------------------------------------------------------------------------------------


def test_each_bad_record_kind_is_counted(tmp_path):
    rows: list[object] = [
        row("Germany", distribution=(2, 2)),
        row("France", distribution=(1, 3)),
        row("Spain", distribution=(0, 0)),  # zero_sum
        row("Italy", options=("A", "B", "C")),  # length_mismatch
        row("Japan", distribution=(float("nan"), 1.0)),  # nan_or_negative
        row("Kenya", distribution=(float("inf"), 1.0)),  # nan_or_negative
        row("Peru", distribution=(-0.1, 1.1)),  # nan_or_negative
        row("Atlantis"),  # unknown_country
        row("Germany (Non-national sample)", distribution=(0.9, 0.1)),  # duplicate of the first row
        row("Chile", options=("A",), distribution=(1.0,)),  # too_few_options
        {"country": "Chile", "question": "Q1?", "options": ["A", "B"]},  # malformed: no distribution
        row("Chile") | {"options": "A, B"},  # malformed: options not a list
        row("Chile") | {"distribution": ["0.5", "0.5"]},  # malformed: shares are text
        row("Chile") | {"distribution": [True, False]},  # malformed: booleans are not shares
        row("Chile") | {"country": 56},  # malformed: country not text
        [1, 2, 3],  # malformed: not an object
    ]
    records, report = load_survey(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert report.read == len(rows)
    assert report.skipped == {
        "zero_sum": 1,
        "length_mismatch": 1,
        "nan_or_negative": 3,
        "unknown_country": 1,
        "duplicate": 1,
        "too_few_options": 1,
        "malformed": 6,
    }
    assert report.kept == 2
    assert [(r.culture, r.iso) for r in records] == [("Germany", "DE"), ("France", "FR")]
    assert records[0].distribution == pytest.approx((0.5, 0.5))
    assert records[1].distribution == pytest.approx((0.25, 0.75))
    assert report.summary().startswith("read 16 records, kept 2, skipped 14 (")


def test_duplicates_keep_best_sample_in_first_position(tmp_path):
    rows = [
        row("India (Non-national sample)", distribution=(0.1, 0.9)),
        row("Japan", distribution=(0.5, 0.5)),
        row("India (Old national sample)", distribution=(0.2, 0.8)),
        row("India (Current national sample)", distribution=(0.3, 0.7)),
        row("India (Non-national sample)", question="Q2?", distribution=(0.6, 0.4)),
        row("Britain", question="Q2?", distribution=(0.4, 0.6)),
        row(
            "Great Britain", question="  q2? ", distribution=(0.7, 0.3)
        ),  # same question, same rank: first wins
    ]
    records, report = load_survey(write_jsonl(tmp_path / "dup.jsonl", rows))
    assert report.skipped == {"duplicate": 3}
    assert [(r.culture, r.question, r.distribution) for r in records] == [
        ("India", "Q1?", pytest.approx((0.3, 0.7))),
        ("Japan", "Q1?", pytest.approx((0.5, 0.5))),
        ("India", "Q2?", pytest.approx((0.6, 0.4))),
        ("United Kingdom", "Q2?", pytest.approx((0.4, 0.6))),
    ]


def test_json_list_and_jsonl_agree(tmp_path):
    rows = [row("Germany", distribution=(1, 3)), row("S. Korea", question="Q2?"), row("Mars")]
    from_jsonl = load_survey(write_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    from_json = load_survey(tmp_path / "a.json")
    assert from_json[0] == from_jsonl[0]
    assert from_json[1].skipped == from_jsonl[1].skipped == {"unknown_country": 1}


def test_nothing_usable_is_an_error(tmp_path):
    path = write_jsonl(
        tmp_path / "empty.jsonl", [row("Spain", distribution=(0, 0)), row("Atlantis"), {"x": 1}]
    )
    with pytest.raises(SurveyDataError) as err:
        load_survey(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert "malformed 1" in message and "unknown_country 1" in message and "zero_sum 1" in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "bad.jsonl",
            '{"country": "France", oops\n[\n',
            "no usable survey records (read 2 records, skipped malformed 2)",
        ),
        ("bad.json", '[\n{"country": "France"},\n{oops}\n]', "line 3"),
        ("data.txt", "whatever", "unknown format '.txt'"),
        ("bad.csv", "a,b\n1,2\n", "missing columns question, selections, options"),
        ("empty.jsonl", "", "no usable survey records (read 0 records)"),
        ("dict.json", '{"country": "France"}', "expected a JSON list"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SurveyDataError) as err:
        load_survey(path)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_bad_lines_options_over_the_letters_and_huge_csv_fields_are_skipped_and_counted(tmp_path):
    many = [f"option {i}" for i in range(27)]  # one more than the letters A-Z
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps(row("Germany")),
                '{"country": "France", oops',  # not JSON
                json.dumps(row("Japan", options=many, distribution=[1] * 27)),
                json.dumps(row("Japan", options=many[:26], distribution=[1] * 26)),  # 26: kept
            ]
        ),
        encoding="utf-8",
    )
    records, report = load_survey(jsonl)
    assert [r.culture for r in records] == ["Germany", "Japan"]
    assert report.skipped == {"malformed": 1, "too_many_options": 1}
    assert "too_many_options 1" in report.summary()

    csv_path = tmp_path / "huge.csv"
    huge = {f"Country{i}": [0.5, 0.5] for i in range(8000)}  # one field of ~150 KB
    csv_path.write_text(
        "question,selections,options,source\n"
        f"Q1?,\"{huge}\",\"['Yes', 'No']\",GAS\n"
        "Q2?,\"{'Italy': [0.2, 0.8]}\",\"['Yes', 'No']\",WVS\n",
        encoding="utf-8",
    )
    assert len(csv_path.read_text()) > 131072
    records, report = load_survey(csv_path)
    assert [(r.culture, r.question) for r in records] == [("Italy", "Q2?")]
    assert report.skipped == {"unknown_country": 8000}


def test_missing_file(tmp_path):
    with pytest.raises(SurveyDataError, match="no such file"):
        load_survey(tmp_path / "absent.jsonl")


def test_csv_bad_rows_are_malformed_and_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "goqa.csv"
    path.write_text(
        "question,selections,options,source\n"
        "Q1?,\"defaultdict(<class 'list'>, {'France': [1, 1], 'Narnia': [1, 0]})\",\"['Yes', 'No']\",GAS\n"
        f"Q2?,\"__import__('pathlib').Path('{marker}').touch()\",\"['Yes', 'No']\",GAS\n"
        'Q3?,"{\'Italy\': [0.2, 0.8]}","not a list",WVS\n'
        "Q4?,\"{'Italy': [0.2, 0.8]}\",\"['Yes', 'No']\",WVS\n",
        encoding="utf-8",
    )
    records, report = load_survey(path)
    assert not marker.exists()
    assert report.read == 5
    assert report.skipped == {"unknown_country": 1, "malformed": 2}
    assert [(r.culture, r.question, r.distribution) for r in records] == [
        ("France", "Q1?", pytest.approx((0.5, 0.5))),
        ("Italy", "Q4?", pytest.approx((0.2, 0.8))),
    ]


@pytest.mark.parametrize("source", ["hf://Anthropic/llm_global_opinions", "Anthropic/llm_global_opinions"])
def test_hub_offline_gives_clear_error(monkeypatch, tmp_path, source):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An empty cache, so a copy downloaded on this machine earlier cannot satisfy the offline request.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SurveyDataError) as err:
        load_survey(source)
    message = str(err.value)
    assert "hf://Anthropic/llm_global_opinions/data/global_opinions.csv" in message
    assert "could not be reached" in message and "local file" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------


def test_normalise_question():
    assert normalise_question("  Do You\n\tAGREE?  ") == "do you agree?"


def test_question_split_is_deterministic_and_whitespace_blind():
    q = "How important is God in your life?"
    variants = [q, q.upper(), f"  {q}\n", q.replace(" ", "  \t")]
    assert len({question_split(v) for v in variants}) == 1
    assert question_split(q) == question_split(q, (0.7, 0.15, 0.15), "")
    assert question_split(q, (1, 0, 0)) == "train"
    assert question_split(q, (0, 1, 0)) == "val"
    assert question_split(q, (0, 0, 1)) == "test"


def test_salt_reshuffles_questions():
    questions = [f"question number {i}" for i in range(200)]
    plain = [question_split(q) for q in questions]
    salted = [question_split(q, salt="seed-1") for q in questions]
    assert plain != salted
    assert salted == [question_split(q, salt="seed-1") for q in questions]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (1.0, -0.5, 0.5), (0, 0, 0), (float("nan"), 0.5, 0.5)])
def test_bad_fractions(fractions):
    with pytest.raises(SurveyDataError, match="fractions"):
        question_split("q", fractions)


@needs_data
@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25)])
def test_split_fractions_roughly_honoured(real, fractions):
    records, _ = real
    parts = split_records(records, fractions)
    assert set(parts) == {"train", "val", "test"}
    assert sum(len(v) for v in parts.values()) == len(records)
    questions = {name: {normalise_question(r.question) for r in part} for name, part in parts.items()}
    # A question sits in exactly one split whatever the culture, so no answer leaks across splits.
    assert not (questions["train"] & questions["val"] or questions["train"] & questions["test"])
    assert not questions["val"] & questions["test"]
    total = sum(len(q) for q in questions.values())
    for name, target in zip(("train", "val", "test"), fractions, strict=True):
        assert abs(len(questions[name]) / total - target) <= 0.05, (name, len(questions[name]) / total)


# ---------------------------------------------------------------------------------------------------------
# Culture selection
# ---------------------------------------------------------------------------------------------------------


def synthetic_records(counts: dict[str, int]) -> list[SurveyRecord]:
    return [rec(c, f"q{i}", (0.5, 0.5)) for c, n in counts.items() for i in range(n)]


SELECTION = synthetic_records({"Germany": 10, "France": 8, "Japan": 8, "Kenya": 8, "Peru": 3, "Chile": 1})


def test_top_n_ranking_ties_and_held_out():
    chosen = select_cultures(SELECTION, top=3)
    # France, Japan and Kenya tie on 8: names break the tie.
    assert chosen.trained == ["Germany", "France", "Japan"]
    assert chosen.held_out == []
    assert chosen.counts == {"Germany": 10, "France": 8, "Japan": 8, "Kenya": 8, "Peru": 3, "Chile": 1}

    chosen = select_cultures(SELECTION, top=3, min_questions=3, held_out=["fr", "Chile"])
    assert chosen.trained == ["Germany", "Japan", "Kenya"]
    assert chosen.held_out == ["France", "Chile"]


def test_top_n_uses_remaining_cultures_after_held_out():
    chosen = select_cultures(SELECTION, top=4, min_questions=3, held_out=["DEU"])
    assert chosen.trained == ["France", "Japan", "Kenya", "Peru"]
    assert "Germany" not in chosen.trained and chosen.held_out == ["Germany"]


def test_named_cultures_any_spelling():
    chosen = select_cultures(SELECTION, cultures=["germany", "JP", "France", "Germany"], held_out=["Kenya"])
    assert chosen.trained == ["Germany", "Japan", "France"]
    assert chosen.held_out == ["Kenya"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"min_questions": 500}, "no culture has at least 500 questions"),
        ({"cultures": ["Germany"], "top": 2}, "at most one of cultures or top"),
        ({"cultures": ["Narnia"]}, "unknown culture 'Narnia'"),
        ({"top": 2, "held_out": ["Narnia"]}, "unknown culture 'Narnia'"),
        ({"top": 2, "held_out": ["Spain"]}, "unknown culture 'Spain'"),
        ({"cultures": ["Peru"], "min_questions": 5}, "'Peru' has 3 questions, fewer than min_questions 5"),
        ({"top": 5, "min_questions": 5}, "only 4 cultures have at least 5 questions, fewer than top 5"),
        ({"top": 4, "min_questions": 5, "held_out": ["Kenya"]}, "only 3 cultures"),
        ({"cultures": ["Germany"], "held_out": ["DE"]}, "both trained and held out"),
        ({"cultures": []}, "cultures is empty"),
        ({"top": 0}, "top must be a positive integer"),
    ],
)
def test_selection_errors(kwargs, expected):
    with pytest.raises((SurveyDataError, UnknownCultureError)) as err:
        select_cultures(SELECTION, **kwargs)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_foreign_file_keeps_the_experts_and_held_out_cultures_it_holds_and_notes_the_rest():
    # Peru has 3 questions: far below any min_questions, yet an expert is scored wherever its culture is.
    chosen, notes = present_cultures(SELECTION, ["Peru", "Japan", "Spain"], ["Chile", "Canada"], "f.jsonl")
    assert chosen.trained == ["Peru", "Japan"] and chosen.held_out == ["Chile"]
    assert notes == [
        "no records in f.jsonl for Spain (expert), Canada (held out): skipped",
        "not evaluated (in f.jsonl, but no expert and not held out): Germany, France, Kenya",
    ]
    assert all("\n" not in n for n in notes)
    # A held-out culture that has an expert by now is the expert's.
    assert present_cultures(SELECTION, ["Chile"], ["chile"], "f")[0].held_out == []
    with pytest.raises(
        SurveyDataError, match=r"^f.jsonl holds no records of the experts' cultures \(Spain\)"
    ):
        present_cultures(SELECTION, ["Spain"], ["Canada"], "f.jsonl")


def test_foreign_data_splits_its_questions_as_training_would():
    records = synthetic_records({"Germany": 40, "France": 5})
    report = LoadReport(path="f.jsonl", read=45, kept=45)
    data, _ = foreign_data(DataSection(cultures=["Japan"]), records, report, ["Germany"])
    test = data.records_of("test", ["Germany"])["Germany"]
    assert 0 < len(test) < 40 and all(question_split(r.question) == "test" for r in test)
    assert len(data.records_of("all", ["Germany"])["Germany"]) == 40


@needs_data
def test_top_selection_on_real_data(real):
    records, _ = real
    chosen = select_cultures(records, top=21, min_questions=60, held_out=["Japan"])
    assert len(chosen.trained) == 21 and "Japan" not in chosen.trained
    assert all(chosen.counts[c] >= 60 for c in chosen.trained)
    assert chosen.trained[:2] == ["Germany", "United States"]


# ---------------------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------------------

SIMILAR = [
    rec("Germany", "q1", (0.5, 0.5)),
    rec("Germany", "q2", (0.9, 0.1)),
    rec("Austria", "Q1", (0.5, 0.5)),  # same question, other case: still matched
    rec("Austria", "q2", (0.9, 0.1)),
    rec("France", "q1", (0.6, 0.4)),
    rec("France", "q2", (0.7, 0.3)),
    rec("Japan", "q1", (1.0, 0.0)),
    rec("Japan", "q2", (0.0, 1.0)),
    rec("Peru", "q3", (0.5, 0.5)),
    rec("Chile", "q1", (0.2, 0.3, 0.5)),  # other options: not comparable with anyone's q1
]


def test_similarity_identical_and_symmetric():
    assert culture_similarity(SIMILAR, "Germany", "Austria") == pytest.approx(1.0)
    assert culture_similarity(SIMILAR, "Germany", "Germany") == pytest.approx(1.0)
    forward = culture_similarity(SIMILAR, "Germany", "France")
    assert forward is not None and 0.0 < forward < 1.0
    assert culture_similarity(SIMILAR, "France", "Germany") == pytest.approx(forward)
    assert culture_similarity(SIMILAR, "de", "fra") == pytest.approx(forward)


def test_similarity_disjoint_is_none():
    assert culture_similarity(SIMILAR, "Germany", "Peru") is None
    assert culture_similarity(SIMILAR, "Germany", "Chile") is None


def test_similarity_known_value():
    # Opposite certainties on two options are one full bit apart: JS distance 1, alignment 0.
    half = [rec("Japan", "q1", (1.0, 0.0)), rec("Kenya", "q1", (0.0, 1.0))]
    assert culture_similarity(half, "Japan", "Kenya") == pytest.approx(0.0, abs=1e-9)


def test_nearest_cultures_ordering():
    ranked = nearest_cultures(SIMILAR, "Germany", None, 10)
    assert [c for c, _ in ranked] == ["Austria", "France", "Japan"]
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0)
    assert nearest_cultures(SIMILAR, "Germany", ["Japan", "FR", "Peru", "Germany"], 1) == [ranked[1]]
    assert nearest_cultures(SIMILAR, "Germany", None, 0) == []


def test_similarity_table_rows_are_each_cultures_nearest():
    experts = ["Germany", "FR", "Japan"]
    table = similarity_table(SIMILAR, None, experts)
    assert set(table) == {"Germany", "Austria", "France", "Japan", "Peru", "Chile"}
    for culture, row in table.items():
        ranked = sorted(row.items(), key=lambda item: (-item[1], item[0]))
        assert ranked == nearest_cultures(SIMILAR, culture, experts, len(experts))
    assert "Germany" not in table["Germany"] and table["Peru"] == {} and table["Chile"] == {}
    # One score a pair, whichever way round it is read.
    assert table["Germany"]["France"] == table["France"]["Germany"]
    assert similarity_table(SIMILAR, ["de"], ["fra"]) == {"Germany": {"France": table["Germany"]["France"]}}


def test_without_cultures_or_top_every_culture_with_enough_questions_gets_an_expert():
    chosen = select_cultures(SELECTION, min_questions=8, held_out=["Kenya"])
    assert chosen.trained == ["Germany", "France", "Japan"]  # Kenya is held out; Peru and Chile are thin
    records, _ = load_survey(OPINIONS)
    assert len(select_cultures(records, min_questions=30).trained) == 52  # the config's default: a few dozen


def test_pooled_records_average_every_country_of_a_question():
    records, _ = load_survey(OPINIONS)
    pooled = {normalise_question(r.question): r for r in pooled_records(records)}
    question = normalise_question(records[0].question)
    answers = [r for r in records if normalise_question(r.question) == question]
    assert len(answers) > 1  # the first record's question was asked in several countries
    mean = np.mean([r.distribution for r in answers], axis=0)
    assert pooled[question].culture == SHARED
    assert np.allclose(pooled[question].distribution, mean) and abs(sum(mean) - 1) < 1e-6


def test_the_prior_learns_from_countries_outside_the_selection_and_never_from_test_questions():
    config = config_with("shared.enabled=true")
    data = prepare_data(config.data, shared=config.shared)
    assert data.experts == [SHARED, "Germany", "Japan", "Kenya"]
    chosen = {normalise_question(r.question) for r in data.splits["train"] if r.culture in data.experts}
    prior = data.records_of("train", [SHARED])[SHARED]
    # Questions only other countries answered are in the prior's training data...
    assert {normalise_question(r.question) for r in prior} - chosen
    # ...and its splits are the survey's: no test question of any culture is a training question of the prior.
    test = {normalise_question(r.question) for r in data.splits["test"]}
    assert not test & {normalise_question(r.question) for r in prior}
    assert len(prior) == len(
        {(normalise_question(r.question), r.options) for r in prior}
    )  # one row a question


def test_max_questions_picks_the_same_questions_every_time():
    records, _ = load_survey(OPINIONS)
    pooled = pooled_records(records)
    first, again = sample_questions(pooled, 50), sample_questions(list(reversed(pooled)), 50)
    assert len(first) == 50 and {r.question for r in first} == {r.question for r in again}
