"""Experts that do no harm: each expert's share of the shared prior, fitted on every rendering of the validation
split only, kept in its file, and used wherever it answers (evaluation, committees, serving), whatever the
question's options."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from orchestrator.calibration import calibrate_experts, choose_weights, fit_prior_weights
from orchestrator.encoding import encode
from orchestrator.evaluate import evaluate, served_committees
from orchestrator.survey import prepare_data, similarity_table
from tests.conftest import config_with, random_expert
from workers.base_model import load_frozen_base
from workers.committees import Committee, culture_committee, with_member_priors, with_prior
from workers.cultures import SHARED, slug
from workers.expert_file import load_expert, save_expert
from workers.prompts import bank_from_experts
from workers.renderings import without_missing
from workers.scoring import option_distributions


@pytest.fixture
def prior_and_experts(llama_dir):
    config = config_with("data.transfer.hold_out=wvs")
    data = prepare_data(config.data)
    base = load_frozen_base(str(llama_dir), device="cpu")
    names = [SHARED, *data.selection.trained]
    experts = [random_expert(base, c, 2, 2, seed) for seed, c in enumerate(names)]
    return base, experts, data


def answers_of(base, experts, records, culture_of=lambda r: r.culture):
    """Each record's distribution from the expert `culture_of(record)` names."""
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    return option_distributions(
        base,
        bank_from_experts(experts, base.device),
        encode(base, records, 256),
        [index[culture_of(r)] for r in records],
    )


def surveyed_as(base, experts, records, who):
    """The records of the experts' cultures with their survey answers replaced by the distributions of
    `who` (a culture, or 'own'); other cultures' records as they are."""
    names = {e.meta.culture for e in experts}
    mine = [r for r in records if r.culture in names]
    dists = answers_of(base, experts, mine, (lambda r: r.culture) if who == "own" else (lambda r: who))
    return [replace(r, distribution=tuple(float(x) for x in d)) for r, d in zip(mine, dists)]


def test_the_prior_weights_read_val_alone(prior_and_experts, tmp_path):
    base, experts, data = prior_and_experts

    def weights(who: dict[str, str]) -> dict[str, float]:
        splits = {
            s: surveyed_as(base, experts, rs, who[s]) if s in who else rs for s, rs in data.splits.items()
        }
        forged = replace(data, splits=splits)
        return {c: f.weight for c, f in fit_prior_weights(base, experts, forged).items()}

    # val answered as the prior: every weight leans on the prior; val answered as each expert: none does.
    # Test and the transfer split are answered the other way round each time: were they read, the weights
    # would follow them.
    prior_val = weights({"val": SHARED, "test": "own", "transfer_val": "own", "transfer_test": "own"})
    own_val = weights({"val": "own", "test": SHARED, "transfer_val": SHARED, "transfer_test": SHARED})
    assert set(prior_val) == set(own_val) == set(data.selection.trained)
    assert all(prior_val[c] > own_val[c] for c in prior_val)
    assert set(own_val.values()) == {0.0}
    # Moving test and transfer data alone moves nothing.
    assert weights({"val": "own", "test": "own", "transfer_val": "own", "transfer_test": "own"}) == own_val


def test_each_cultures_weight_is_best_on_its_worst_rendering_and_never_below_the_prior_there():
    survey, near, far = np.array([0.6, 0.4]), np.array([0.59, 0.41]), np.array([0.1, 0.9])
    between = np.array([0.35, 0.65])

    def rows(expert, prior, n):
        return [(expert, prior, survey)] * n

    # A: the expert is right, the prior wrong; B: the reverse; C: both off, on either side of the answers.
    fits = choose_weights(
        {
            "A": {"as_written": rows(near, far, 30), "no_missing": rows(near, far, 30)},
            "B": {"as_written": rows(far, near, 3)},
            "C": {"as_written": rows(between, near, 2)},
            # D: right as written, wrong once the codes go: the worst rendering decides, so the prior.
            "D": {"as_written": rows(near, far, 5), "no_missing": rows(far, near, 5)},
        }
    )
    assert fits["A"].weight == 0.0 and fits["A"].mixed == fits["A"].expert
    assert fits["B"].weight == 1.0 and fits["B"].mixed > fits["B"].expert
    assert 0.0 < fits["C"].weight <= 1.0
    assert 0.0 < fits["D"].weight < 1.0  # the mix that is best where it is worst
    for fit in fits.values():
        assert fit.n > 0 and fit.mixed >= fit.expert


def test_dropping_a_questions_codes_changes_no_weight_in_its_committee(prior_and_experts):
    base, experts, data = prior_and_experts
    experts = [replace(e, meta=replace(e.meta, prior_weight=0.3)) for e in experts]
    trained = data.selection.trained
    committee_of = served_committees(
        experts, similarity_table(data.records, [*trained, "Canada"], trained), 2, 0.05
    )
    coded = [r for r in data.splits["transfer_test"] if without_missing(r.options) and r.culture in trained]
    assert coded
    for record in (
        coded[:20] + [r for r in data.records if r.culture == "Canada" and without_missing(r.options)][:5]
    ):
        dropped = without_missing(record.options)
        bare = replace(
            record, options=dropped.options, distribution=tuple(dropped.target(record.distribution))
        )
        assert committee_of(bare).members == committee_of(record).members


def test_served_committees_give_each_member_its_share_of_the_prior():
    committee = Committee([("Germany", 0.75), ("Japan", 0.25)])
    served = with_member_priors(committee, {"Germany": 0.2, "Japan": 1.0})
    assert dict(served.members) == pytest.approx({"Germany": 0.6, SHARED: 0.4})
    assert with_member_priors(committee, {}).members == committee.members
    # with_prior on a committee that already holds the prior adds to its weight, one member a culture.
    assert dict(with_prior(served, 0.5).members) == pytest.approx({"Germany": 0.3, SHARED: 0.7})
    # A culture's own expert answers with its share; without the prior served, alone.
    experts = ["Germany", "Japan", SHARED]
    own = culture_committee("Germany", experts, {}, 2, 0.05, prior_weights={"Germany": 0.3})
    assert dict(own.members) == pytest.approx({"Germany": 0.7, SHARED: 0.3})
    alone = culture_committee("Germany", experts[:2], {}, 2, 0.05, prior_weights={"Germany": 0.3})
    assert alone.members == [("Germany", 1.0)]


def test_the_weight_travels_in_the_expert_file_and_the_report_scores_the_expert_as_served(
    prior_and_experts, tmp_path
):
    base, experts, data = prior_and_experts
    germany = next(e for e in experts if e.meta.culture == "Germany")
    path = save_expert(
        tmp_path / "germany.safetensors", replace(germany, meta=replace(germany.meta, prior_weight=1.0))
    )
    assert load_expert(path).meta.prior_weight == 1.0
    assert load_expert(save_expert(tmp_path / "g0.safetensors", germany)).meta.prior_weight == 0.0
    served = [load_expert(path) if e.meta.culture == "Germany" else e for e in experts]
    report = evaluate(base, served, data, "test", ["Germany", "Japan"], n_bootstrap=10)
    # Germany's expert answers wholly as the prior (weight 1); Japan's, weight 0, as its own prompt.
    assert report["cultures"]["Germany"]["expert"] == pytest.approx(report["cultures"]["Germany"][SHARED])
    assert report["cultures"]["Japan"]["expert"] != pytest.approx(report["cultures"]["Japan"][SHARED])
    assert report["prior_weights"] == {"Germany": 1.0}


def test_calibration_writes_each_weight_into_its_file_and_the_committees_into_the_priors(
    prior_and_experts, tmp_path
):
    base, experts, data = prior_and_experts
    files = {
        e.meta.culture: save_expert(tmp_path / f"{slug(e.meta.culture)}.safetensors", e) for e in experts
    }
    prior_file = files.pop(SHARED)
    # val answered exactly as each expert answers: every expert answers alone.
    own = replace(data, splits=data.splits | {"val": surveyed_as(base, experts, data.splits["val"], "own")})
    weights = calibrate_experts(base, files, prior_file, own, "auto")
    for culture, path in files.items():
        assert load_expert(path).meta.prior_weight == weights[culture] == 0.0
    assert load_expert(prior_file).meta.prior_weight == weights[SHARED]
    # A number sets every weight, the committees' too.
    weights = calibrate_experts(base, files, prior_file, own, 0.4)
    assert {load_expert(p).meta.prior_weight for p in [*files.values(), prior_file]} == {0.4}
