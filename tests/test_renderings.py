"""Renderings: each maps back exactly; answers combine both option orders, so a position-biased model's answer
does not depend on the order; training draws renderings; the shipped recipe trains on every programme;
evaluation reports every rendering and names the worst."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from orchestrator.config import load_config
from orchestrator.encoding import encoded, training_examples
from orchestrator.evaluate import evaluate, served_committees
from orchestrator.report_view import format_table
from orchestrator.survey import normalise_question, prepare_data, question_programmes, similarity_table
from tests.conftest import REPO, config_with, random_expert
from workers.chat import chat_prompt
from workers.cultures import SHARED
from workers.renderings import (
    AS_WRITTEN,
    CHAT,
    NO_MISSING,
    NUMBERED_SCALE,
    RENDERINGS,
    REVERSED,
    is_missing_code,
    numbered_scale,
    rendering,
    renderings,
    training_renderings,
    without_missing,
)
from workers.scoring import (
    ANSWER_PREFIX,
    LETTERS,
    encode_question,
    option_distributions,
    question_body,
    question_text,
)

WVS_SCALE = ["Never justifiable", *map(str, range(2, 10)), "Always justifiable", "Don't know", "No answer"]
SHARES = [0.3, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05, 0.05, 0.05, 0.15, 0.06, 0.04]


@pytest.mark.parametrize(
    "option, code",
    [
        ("Don't know", True),
        ("Don\u2019t Know", True),
        ("DK/Refused", True),
        ("No answer", True),
        ("No answer/Refused", True),
        ("Other missing; Multiple answers Mail (EVS)", True),
        ("Missing; Not available", True),
        ("Don't -9:-2", True),
        ("Don't mind", False),
        ("Don't belong", False),
        ("No", False),
        ("Not at all", False),
    ],
)
def test_missing_value_codes_are_told_from_answers(option, code):
    assert is_missing_code(option) is code


def test_dropping_codes_renormalises_the_survey_and_maps_an_answer_back():
    dropped = without_missing(WVS_SCALE)
    assert dropped.options == tuple(WVS_SCALE[:10])
    target = dropped.target(SHARES)
    assert target.sum() == pytest.approx(1) and target == pytest.approx(np.array(SHARES[:10]) / 0.9)
    back = dropped.back(target, len(WVS_SCALE))
    assert back[10:].tolist() == [0, 0] and back[:10] == pytest.approx(target)
    assert without_missing(["Yes", "No"]) is None  # nothing to drop
    assert without_missing(["Yes", "DK/Refused"]) is None  # one answer would be left


def test_a_reversed_order_maps_back_to_the_original_options():
    flipped = rendering(WVS_SCALE, REVERSED)
    assert flipped.options == tuple(reversed(WVS_SCALE))
    assert flipped.target(SHARES).tolist() == pytest.approx(SHARES[::-1])
    answer = np.random.default_rng(0).dirichlet(np.ones(len(WVS_SCALE)))
    assert flipped.back(answer, len(WVS_SCALE)).tolist() == pytest.approx(answer[::-1].tolist())


def test_scale_points_are_numbered_with_their_labelled_ends():
    numbered = numbered_scale(WVS_SCALE)
    assert numbered.options[0] == "1 = Never justifiable" and numbered.options[9] == "10 = Always justifiable"
    assert numbered.options[1:9] == tuple(map(str, range(2, 10))) and numbered.options[10:] == tuple(
        WVS_SCALE[10:]
    )
    assert numbered.target(SHARES).tolist() == pytest.approx(SHARES)
    zero_to_ten = ["Not important at all", *(f"{i}.0" for i in range(1, 10)), "Very important"]
    assert numbered_scale(zero_to_ten).options == (
        "0 = Not important at all",
        *map(str, range(1, 10)),
        "10 = Very important",
    )
    down = ["Satisfied", *map(str, range(9, 1, -1)), "Dissatisfied"]
    assert (
        numbered_scale(down).options[0] == "10 = Satisfied"
        and numbered_scale(down).options[-1] == "1 = Dissatisfied"
    )
    assert numbered_scale(["Yes", "No"]) is None
    assert set(renderings(["Yes", "No"])) == {AS_WRITTEN, REVERSED}
    assert rendering(["Yes", "No"], NUMBERED_SCALE).options == ("Yes", "No")  # left as written


def test_training_draws_every_combination_of_the_renderings_that_apply():
    shown = training_renderings(WVS_SCALE)
    assert shown[0].name == AS_WRITTEN and len(shown) == 8 == len({r.options for r in shown})
    survey = np.array(SHARES)
    for r in shown:
        # Each maps its target back onto the original options: the same answers, codes renormalised away.
        back = r.back(r.target(survey), len(survey))
        kept = sorted(set(r.source))
        assert back[kept] == pytest.approx(survey[kept] / survey[kept].sum())
    assert len(training_renderings(["Yes", "No"])) == 2


@pytest.fixture
def order_biased(llama_base):
    """The tiny Llama made to favour the letter A: an output layer with a bias of 8 on "A" and " A"."""
    base = llama_base
    head = base.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        for text in ("A", " A"):
            biased.bias[base.tokenizer.encode(text, add_special_tokens=False)[-1]] = 8.0
    base.model.lm_head = biased
    return base


def test_both_orders_make_a_position_biased_models_answers_order_invariant(order_biased):
    base = order_biased
    options = ["Agree", "Neither", "Disagree"]

    def answer(shown, both_orders):
        q = encode_question(base.tokenizer, "Do you agree?", shown, both_orders=both_orders)
        return option_distributions(base, None, [q])[0]

    one, flipped = answer(options, False), answer(options[::-1], False)[::-1]
    assert one[0] > 0.5 and flipped[2] > 0.5  # one order: the option written first wins, whichever it is
    assert not np.allclose(one, flipped, atol=0.05)
    both, both_flipped = answer(options, True), answer(options[::-1], True)[::-1]
    assert both == pytest.approx(both_flipped, abs=1e-6)
    assert len(LETTERS) >= len(options)


def test_training_examples_carry_their_renderings_and_validation_both_orders(llama_base):
    data = prepare_data(config_with().data)
    train = encoded(llama_base, data, "train", ["Germany"], 256)["Germany"]
    records = data.records_of("train", ["Germany"])["Germany"]
    # Each rendering asked as a survey ("...Answer:") and as a chat (the assistant's turn, nothing of ours).
    assert all(len(q.renderings) == 2 * len(training_renderings(r.options)) for q, r in zip(train, records))
    answer = llama_base.tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    ends = Counter(x.input_ids[-len(answer) :] == answer for q in train for x in q.renderings)
    assert ends[True] == ends[False] > 0
    assert all(not x.reversed_ids for q in train for x in q.renderings)  # a draw is one order
    val = encoded(llama_base, data, "val", ["Germany"], 256)["Germany"]
    assert val and all(q.reversed_ids and not q.renderings for q in val)
    assert training_examples(llama_base, records[:1], 256)[0].target == pytest.approx(records[0].distribution)


def test_the_shipped_recipe_trains_on_every_programme():
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.data.transfer is None
    data = prepare_data(config.data, shared=config.shared)
    programmes = question_programmes(data.records)
    for records in (data.splits["train"], data.pooled["train"]):
        counts = Counter(programmes[normalise_question(r.question)] for r in records)
        assert counts["pew"] > 50 and counts["wvs"] > 50


def test_the_report_scores_every_rendering_and_names_the_worst(llama_base):
    data = prepare_data(config_with().data)
    experts = [
        random_expert(llama_base, c, 2, 2, seed) for seed, c in enumerate([SHARED, "Germany", "Kenya"])
    ]
    similarity = similarity_table(data.records, ["Germany", "Kenya", "Canada"], ["Germany", "Kenya"])
    committees = served_committees(experts, similarity, 2, 0.05)
    cultures = ["Germany", "Kenya", "Canada"]
    report = evaluate(llama_base, experts, data, "test", cultures, committees, n_bootstrap=10)
    assert set(report["renderings"]) == set(RENDERINGS)
    written = report["renderings"][AS_WRITTEN]["overall"]
    assert written["expert"] == pytest.approx(report["overall"]["expert"])
    # Both orders combined: reversing every question's options changes no answer.
    flipped = report["renderings"][REVERSED]
    for column in ("base", SHARED, "expert"):
        assert flipped["overall"][column] == pytest.approx(written[column])
    dropped = report["renderings"][NO_MISSING]["overall"]
    assert dropped["n"] == written["n"] and dropped["uniform"] != pytest.approx(written["uniform"])
    worst = report["worst_rendering"]["expert"]
    gains = {
        n: s["overall"]["differences"][f"expert-{SHARED}"]["mean"] for n, s in report["renderings"].items()
    }
    assert gains[worst] == min(gains.values())
    assert report["renderings"][worst]["held_out"]["committee"] is not None
    assert f"renderings (the worst counts: experts {worst}" in format_table(report)
    # Each rendering pooled by survey programme, over the records of the cultures with experts.
    by_programme = report["renderings"][NO_MISSING]["by_programme"]
    assert set(by_programme) <= {"pew", "wvs", "unknown"} and len(by_programme) > 1
    with_experts = report["overall"]["differences"][f"expert-{SHARED}"]["n"]
    assert sum(row["n"] for row in by_programme.values()) == with_experts

    # The chat path beside the opinion path, over the same records of the cultures with experts.
    chat = report["chat"]
    assert chat["n"] == with_experts
    first = report["renderings"][CHAT]["with_experts"]
    assert chat["first_token"]["gain"] == pytest.approx(first["expert"] - first["base"])
    opinion = report["renderings"][AS_WRITTEN]["with_experts"]
    opinion_gain = opinion["expert"] - opinion["base"]
    if opinion_gain > 0:
        assert chat["gain_ratio"] == pytest.approx(chat["first_token"]["gain"] / opinion_gain)
    else:  # no gain on the opinion path to be a share of
        assert chat["gain_ratio"] is None
    assert all(0 < m <= 1 for m in chat["mass_on_options"].values())
    sampled = chat["sampled"]
    assert sampled["draws"] == 8 and 0 <= sampled["chat"] <= 1 and sampled["opinion"] < sampled["survey"] < 1
    assert "the chat path" in format_table(report)


def test_the_chat_rendering_is_what_a_chat_sends(tiny_base):
    """The chat rendering's prompt is the one /v1/chat/completions renders for the question as the user's
    message (serve/pool.py renders messages with chat_prompt too), with and without a chat template."""
    options, tokenizer = ["Yes", "No", "Don't know"], tiny_base.tokenizer
    sent = [{"role": "user", "content": question_body("Do you trust people?", options)}]
    assert question_text(tokenizer, "Do you trust people?", options, chat=True) == chat_prompt(
        tokenizer, sent
    )
    assert question_text(tokenizer, "Do you trust people?", options).endswith(ANSWER_PREFIX)
