"""Experts that do no harm: each expert's shares of the shared prior, fitted on validation splits only, kept in
its file, and used wherever it answers (evaluation, committees, serving), per question's answer formats."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from orchestrator.calibration import (
    calibrate_experts,
    calibration_split,
    choose_weights,
    fit_format_gate,
    fit_prior_weights,
)
from orchestrator.encoding import encode
from orchestrator.evaluate import evaluate, evaluate_beside_transfer
from orchestrator.survey import prepare_data, similarity_table
from tests.conftest import OPINIONS, TINY_CONFIG, config_with, random_expert
from workers.answer_formats import (
    FormatGate,
    familiarity,
    option_grams,
    prior_weights,
    separating_threshold,
    training_grams,
)
from workers.base_model import load_frozen_base
from workers.committees import Committee, culture_committee, with_member_priors, with_prior
from workers.cultures import SHARED, slug
from workers.expert_file import load_expert, save_expert
from workers.expert_store import SIMILARITY_FILE
from workers.prompts import bank_from_experts
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


def test_the_prior_weight_is_fitted_on_the_calibration_split_and_never_on_test(prior_and_experts):
    base, experts, data = prior_and_experts
    cultures = data.selection.trained
    # Calibration records answered exactly as the prior answers, every other split's as the expert does:
    # fitted on transfer_val, each weight is 1; one record of any other split read would pull it lower.
    splits = {
        split: surveyed_as(base, experts, records, SHARED if split == "transfer_val" else "own")
        for split, records in data.splits.items()
    }
    data = replace(data, splits=splits)
    assert calibration_split(data) == "transfer_val"
    fits = fit_prior_weights(base, experts, data)
    assert set(fits) == set(cultures)
    for culture, fit in fits.items():
        assert fit.weight == 1.0 and fit.n == len(data.records_of("transfer_val", [culture])[culture])
        assert fit.mixed > 0.99 > fit.expert  # 1 up to float error (the distance is a square root)
    # Without a transfer split the calibration split is val: answered as the expert answers, weight 0.
    plain = replace(data, transfer=None)
    assert calibration_split(plain) == "val"
    assert {f.weight for f in fit_prior_weights(base, experts, plain).values()} == {0.0}


def test_each_cultures_weight_is_its_own_optimum_and_never_below_the_prior_on_its_records():
    survey, near, far = np.array([0.6, 0.4]), np.array([0.59, 0.41]), np.array([0.1, 0.9])
    between = np.array([0.35, 0.65])

    def rows(expert, prior, n):
        return [(expert, prior, survey)] * n

    # A: the expert is right, the prior wrong; B: the reverse; C: both off, on either side of the answers.
    fits = choose_weights({"A": rows(near, far, 30), "B": rows(far, near, 3), "C": rows(between, near, 2)})
    assert fits["A"].weight == 0.0 and fits["A"].mixed == fits["A"].expert
    assert fits["B"].weight == 1.0 and fits["B"].mixed > fits["B"].expert
    assert 0.0 < fits["C"].weight <= 1.0
    for fit in fits.values():
        assert fit.n > 0 and fit.mixed >= fit.expert


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


def test_the_candidates_experiment_fits_on_transfer_val_what_training_fits(prior_and_experts, tmp_path):
    from bench.experiments.transfer_candidates import main as candidates_main

    base, experts, data = prior_and_experts
    folder = tmp_path / "experts"
    for expert in experts:
        save_expert(folder / f"{slug(expert.meta.culture)}.safetensors", expert)
    trained = data.selection.trained
    (folder / SIMILARITY_FILE).write_text(
        json.dumps(similarity_table(data.records, [*trained, "Canada"], trained))
    )
    out = tmp_path / "candidates.json"
    sets = [f"base_model.name={base.name}", f"data.path={OPINIONS}", "data.transfer.hold_out=wvs"]
    candidates_main(
        [
            "--config",
            str(TINY_CONFIG),
            *[x for s in sets for x in ("--set", s)],
            "--experts",
            str(folder),
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    table = report["candidates"]
    assert set(table) == {
        "raw",
        "mix pooled",
        "mix per culture",
        "mix per culture, shrunk",
        "mix per culture, format-gated",
        "log-linear pooled",
        "temperature pooled",
    }
    fitted = {c: f.weight for c, f in fit_prior_weights(base, experts, data).items()}
    assert table["mix per culture"]["fitted"]["w"] == fitted
    # The weights shores train writes: on familiar answer formats fitted on val, on the others on transfer_val.
    familiar = {c: f.weight for c, f in fit_prior_weights(base, experts, data, split="val").items()}
    gated = table["mix per culture, format-gated"]["fitted"]
    assert gated == {"w familiar": familiar, "w unfamiliar": fitted}
    assert report["format_gate"]["threshold"] == fit_format_gate(data, trained).threshold
    for row in table.values():
        assert {"val", "test", "transfer_val", "transfer_test", "cross_fitted"} <= set(row)
        assert row["transfer_test"]["n"] == sum(
            len(r) for r in data.records_of("transfer_test", trained).values()
        )
    # Fitted on transfer_val, the per-culture mixture is never below the prior there, culture by culture.
    assert (
        table["mix per culture"]["transfer_val"]["diff"] >= 0
        and table["mix per culture"]["transfer_val"]["below_ci"] == 0
    )
    assert set(report["committees"]) and "Canada" not in report["prior_by_options"]


def test_a_question_is_familiar_when_its_option_words_were_seen_in_training():
    grams = training_grams([["Strongly agree", "Agree", "Disagree"], ["Yes", "No", "DK/Refused"]])
    assert option_grams(["Yes", "No"]) == {"yes", "no", "yes no"}
    assert familiarity(["Agree", "Disagree"], grams) == 1.0  # "agree disagree" is a pair of the first list
    assert familiarity(["Yes", "No answer"], grams) == pytest.approx(3 / 5)  # not "answer", "no answer"
    assert familiarity([], grams) == 0.0
    # The threshold that tells the two sets apart with the fewest errors; ties to the lowest.
    assert separating_threshold([1.0, 0.95, 0.9, 0.8], [0.2, 0.4, 0.85]) == 0.9  # 1/4 below it, none above
    assert separating_threshold([1.0, 0.9, 0.5], [0.2, 0.4, 0.6]) == 0.5  # 0.9 errs as much
    assert separating_threshold([1.0], [0.2]) == 1.0
    with pytest.raises(ValueError):
        separating_threshold([], [0.2])
    gate = FormatGate(grams, 0.8, unfamiliar_weight=1.0)
    assert gate.familiar(["Agree", "Disagree"]) and not gate.familiar(["1", "2", "10"])
    assert not gate.familiar(None)  # free text is no answer format the expert was trained on
    assert FormatGate.from_json(json.loads(json.dumps(gate.to_json()))) == gate


def test_an_expert_takes_its_gate_s_share_of_the_prior_on_unfamiliar_answer_formats(
    prior_and_experts, tmp_path
):
    base, experts, data = prior_and_experts
    germany = next(e for e in experts if e.meta.culture == "Germany")
    test_options = [r.options for r in data.splits["test"]]
    gate = FormatGate(training_grams(test_options), 1.0, unfamiliar_weight=1.0)
    gated = replace(germany, meta=replace(germany.meta, prior_weight=0.0, format_gate=gate))
    path = save_expert(tmp_path / "germany.safetensors", gated)
    assert load_expert(path).meta.format_gate == gate and load_expert(path).meta.prior_weight == 0.0
    # The weights one question gets: the expert alone on test's answer formats, the prior on others.
    assert prior_weights([gated.meta], test_options[0]) == {}
    assert prior_weights([gated.meta], ["Not at all", "Completely", "No answer (EVS)"]) == {"Germany": 1.0}
    transfer = data.records_of("transfer_test", ["Germany"])["Germany"]
    assert transfer and not any(gate.familiar(r.options) for r in transfer)
    served = [load_expert(path) if e.meta.culture == "Germany" else e for e in experts]
    report = evaluate_beside_transfer(base, served, data, "test", ["Germany"], n_bootstrap=10)
    on_test, on_transfer = report["cultures"]["Germany"], report["transfer"]["cultures"]["Germany"]
    assert on_test["expert"] != pytest.approx(on_test[SHARED])  # familiar: the expert as trained
    assert on_transfer["expert"] == pytest.approx(on_transfer[SHARED])  # unfamiliar: wholly the prior
    assert report["unfamiliar_prior_weights"] == {"Germany": 1.0}


def test_the_two_weights_and_the_gate_are_fitted_on_val_and_transfer_val_and_never_on_test(
    prior_and_experts, tmp_path
):
    base, experts, data = prior_and_experts
    # val answered exactly as each expert answers, transfer_val as the prior; test and transfer_test the other
    # way round, so a single record of either read would move a weight.
    who = {"val": "own", "transfer_val": SHARED, "test": SHARED, "transfer_test": "own"}
    splits = {s: surveyed_as(base, experts, rs, who[s]) if s in who else rs for s, rs in data.splits.items()}
    data = replace(data, splits=splits)
    files = {
        e.meta.culture: save_expert(tmp_path / f"{slug(e.meta.culture)}.safetensors", e) for e in experts
    }
    prior_file = files.pop(SHARED)
    weights = calibrate_experts(base, files, prior_file, data, "auto", k=2, temperature=0.05)
    gate = fit_format_gate(data, list(files))
    for culture, path in files.items():
        meta = load_expert(path).meta
        assert meta.prior_weight == weights[culture] == 0.0  # fitted on val
        assert meta.format_gate == replace(gate, unfamiliar_weight=1.0)  # fitted on transfer_val
    # The gate reads the training split's options and tells val from transfer_val; test never enters it.
    assert gate.grams == training_grams(r.options for r in data.splits["train"])
    blind = replace(data, splits=data.splits | {"test": [], "transfer_test": []})
    assert fit_format_gate(blind, list(files)) == gate
    familiar = [gate.familiar(r.options) for r in data.splits["val"]]
    unfamiliar = [not gate.familiar(r.options) for r in data.splits["transfer_val"]]
    assert sum(familiar) / len(familiar) + sum(unfamiliar) / len(unfamiliar) > 1  # better than chance
    # Without a transfer split there is one weight, fitted on val, and no gate.
    calibrate_experts(base, files, prior_file, replace(data, transfer=None), "auto", k=2, temperature=0.05)
    assert all(load_expert(p).meta.format_gate is None for p in files.values())
