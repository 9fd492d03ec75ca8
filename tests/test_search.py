"""The search space in Tune's forms, a seed per sample, each culture's winner across the whole search, and
experts of the searched lengths served and evaluated together."""

import hashlib
import json

import numpy as np
import pytest
from pydantic import ValidationError
from ray import tune

from orchestrator.cli import main as shores
from orchestrator.config import ConfigError, load_config
from orchestrator.driver import train
from orchestrator.publish import publish_experts
from orchestrator.registry import TRIAL_TAG, Store
from orchestrator.results import Winner, finished_trials
from orchestrator.survey import prepare_data
from orchestrator.trial import trial_config
from orchestrator.tune import expected_trials, experiment_path, param_space, run_trial
from tests.conftest import OPINIONS, TINY_CONFIG, config_with, running_ray, tiny_config
from tests.serving import client, local_serve
from workers.cultures import slug
from workers.expert_store import load_experts


def test_every_tune_form_becomes_its_tune_domain():
    config = config_with(
        "tune.num_samples=3",
        "tune.search_space={lr: {loguniform: [0.001, 0.1]}, weight_decay: {uniform: [0, 0.1]}, "
        "num_virtual_tokens: {choice: [4, 8]}, batch_size: [2, 4]}",
    )
    space = param_space(config, n_groups=2)
    assert space["group"] == tune.grid_search([0, 1]) and space["sample"] == tune.grid_search([0, 1, 2])
    assert space["batch_size"] == tune.grid_search([2, 4])  # a plain list is a grid
    assert isinstance(space["lr"], tune.search.sample.Float) and space["lr"].lower == 0.001
    assert isinstance(space["weight_decay"], tune.search.sample.Float)
    assert space["num_virtual_tokens"].categories == [4, 8]  # integers, as the config says
    # Groups x samples x grid values; distributions add no trials of their own.
    data = prepare_data(config.data, shared=config.shared)
    assert expected_trials(config, data) == 3 * 3 * 2  # tiny.yaml: one culture a trial
    with_prior = config.model_copy(update={"shared": config.shared.model_copy(update={"enabled": True})})
    data = prepare_data(with_prior.data, shared=with_prior.shared)
    assert expected_trials(with_prior, data) == 4 * 3 * 2  # the shared prior is a trial of its own


def test_each_sample_trains_with_its_own_seed():
    config = config_with("train.seed=7", "tune.num_samples=2")
    seeds = [trial_config(config, {"group": 0, "sample": i}).train.seed for i in range(2)]
    assert seeds == [7, 8]


@pytest.mark.parametrize(
    "space, message",
    [
        (
            "{lr: {uniform: [0.1, 0.01]}}",
            "tune.search_space.lr: Value error, uniform: low must be below high",
        ),
        ("{lr: {loguniform: [0, 1]}}", "loguniform: low must be above 0"),
        ("{lr: {grid: [0.1], choice: [0.2]}}", "give exactly one of grid, choice, uniform, loguniform"),
        ("{lr: {normal: [0, 1]}}", "tune.search_space.lr.normal: Extra inputs are not permitted"),
        ("{momentum: [0.9]}", "tune.search_space.momentum"),
        # Values are validated as the config's own keys are.
        ("{lr: [0, -0.01]}", "tune.search_space.lr: 0.0: Input should be greater than 0"),
        ("{lr: {choice: [0.01, -0.01]}}", "tune.search_space.lr: -0.01: Input should be greater than 0"),
        ("{num_virtual_tokens: [0]}", "tune.search_space.num_virtual_tokens: 0.0: Input should be greater"),
        ("{num_virtual_tokens: [4.5]}", "tune.search_space.num_virtual_tokens: 4.5: .* fractional part"),
        ("{batch_size: {uniform: [0, 8]}}", "tune.search_space.batch_size: 0.0: Input should be greater"),
        ("{weight_decay: {uniform: [-0.1, 0.1]}}", "tune.search_space.weight_decay: -0.1"),
    ],
)
def test_a_bad_search_space_is_one_line_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        config_with(f"tune.search_space={space}")
    assert "\n" not in str(caught.value)


def test_searched_values_are_checked_with_the_rest_of_the_config_and_when_sampled():
    # prefix_layers keeps the lower layers fixed, which weight decay would shrink: refused in the search too.
    with pytest.raises(ConfigError, match="tune.search_space.weight_decay: 0.1: .*prefix_layers"):
        config_with("train.prefix_layers=2", "tune.search_space={weight_decay: [0, 0.1]}")
    config = config_with("tune.search_space={lr: {loguniform: [0.001, 0.1]}}")
    assert trial_config(config, {"group": 0, "sample": 0, "lr": 0.01}).train.lr == 0.01
    with pytest.raises(ValidationError, match="lr"):  # whatever a sampler hands a trial is checked again
        trial_config(config, {"group": 0, "sample": 0, "lr": -1.0})


@pytest.mark.slow
def test_the_better_learning_rate_wins_for_every_culture(llama_dir, tmp_path, local_ray):
    # One group of two cultures, two learning rates: one that learns and one that cannot move the prompt.
    config = load_config(
        TINY_CONFIG,
        [
            f"base_model.name={llama_dir}",
            f"output_dir={tmp_path}",
            f"data.path={OPINIONS}",
            "data.cultures=[Germany, Japan]",
            "tune.experts_per_trial=2",
            "tune.scheduler=fifo",
            "tune.search_space={lr: {grid: [1e-9, 0.05]}}",
            "train.epochs=3",
            # The plain shuffle: with it both cultures learn at 0.05 on this tiny random model in 3 epochs;
            # with length-sorted runs Japan's prompt never beats its start, and the test would compare two
            # untrained prompts instead of the search's choice.
            "train.length_buckets=1",
        ],
    )
    outcome = train(config)
    assert outcome.experts == ["Germany", "Japan"]
    published = {e.meta.culture: e.meta.training for e in load_experts(config.experts_dir)}
    for culture, training in published.items():
        assert training["lr"] == 0.05, culture
        # The winner validates above where it started: the learning rate that learns is the better one.
        assert training["val_alignment"] > training["initial_val_alignment"], culture
    registered = {r.culture: r for r in outcome.registered}
    assert {c: round(r.val_alignment, 6) for c, r in registered.items()} == {
        c: round(t["val_alignment"], 6) for c, t in published.items()
    }


@pytest.mark.slow
def test_asha_stops_a_clearly_worse_trial_and_each_culture_wins_in_its_own_trial(
    llama_dir, tmp_path, local_ray
):
    # Two culture groups, each tried at a learning rate that learns and one that cannot move the prompt:
    # four trials, one at a time, the good rate first. ASHA (one rung, at epoch 1) stops a trial whose gain
    # is below those recorded there before it, so the trials at 1e-9 end after one epoch of three.
    config, _ = tiny_config(
        llama_dir,
        tmp_path,
        "data.cultures=[Germany, Japan]",
        "tune.experts_per_trial=1",
        "tune.scheduler=asha",
        "tune.grace_period=1",
        "tune.max_concurrent_trials=1",
        "tune.search_space={lr: {grid: [0.05, 1e-9]}}",
        "train.epochs=3",
        "train.length_buckets=1",  # as above: both cultures learn at 0.05 with the plain shuffle
    )
    outcome = train(config)
    results = tune.Tuner.restore(str(tmp_path / "tune" / "tiny"), run_trial).get_results()
    assert outcome.experts == ["Germany", "Japan"] and not outcome.failed
    trials = {(r.config["group"], r.config["lr"]): r for r in results}
    epochs = {key: int(r.metrics["epoch"]) for key, r in trials.items()}
    assert epochs[(0, 1e-9)] == epochs[(1, 1e-9)] == 1, epochs  # stopped by ASHA, not failed
    assert all(r.error is None for r in results)
    assert epochs[(0, 0.05)] == 3, epochs  # the first at the rung always goes on
    # Each culture's winner is its own group's trial at the rate that learns: two different trials.
    client = Store.from_config(config).client()
    winner_trials = {
        row.culture: client.get_model_version(row.model, str(row.version)).tags[TRIAL_TAG]
        for row in outcome.registered
    }
    assert winner_trials == {
        "Germany": trials[(0, 0.05)].metrics["trial_id"],
        "Japan": trials[(1, 0.05)].metrics["trial_id"],
    }


PINNED = {"Germany": 4, "Japan": 8}
QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}


@pytest.mark.slow
def test_experts_of_lengths_4_and_8_train_serve_and_evaluate_together(llama_dir, tmp_path):
    """Experts of different prompt lengths, end to end: a search over num_virtual_tokens, then served and
    evaluated together (one prompt bank, one batch, committees that mix lengths).

    Which length wins a culture is the validation's choice, so a search alone may publish one length only. To
    serve both lengths every time, the test pins the winners: from the search's own checkpoints it publishes
    Germany's 4-token expert and Japan's 8-token one with the same `publish_experts` that training uses.
    """
    sets = [
        f"base_model.name={llama_dir}",
        f"output_dir={tmp_path / 'run'}",
        f"data.path={OPINIONS}",
        "data.cultures=[Germany, Japan]",
        "tune.experts_per_trial=1",
        "tune.scheduler=fifo",
        "tune.search_space={num_virtual_tokens: [4, 8]}",
        "train.epochs=1",
        "serve.deployment.reload_interval_s=0",
    ]
    config = load_config(TINY_CONFIG, sets)
    with running_ray():
        outcome = train(config)
        trials = finished_trials(tune.Tuner.restore(experiment_path(config), run_trial).get_results())
    assert outcome.experts == ["Germany", "Japan"]
    assert {e.prompt.shape[0] for e in load_experts(config.experts_dir)} <= {4, 8}

    # Every culture was trained at both lengths; pin one length each from those checkpoints.
    trained: dict[tuple[str, int], Winner] = {}
    for trial in trials:
        for meta in trial.expert_metas():
            key = (meta.culture, meta.num_virtual_tokens)
            trained[key] = Winner(meta.culture, trial.trial_id, trial.experts, meta.training["val_alignment"])
    assert set(trained) == {(c, n) for c in PINNED for n in (4, 8)}
    mixed = tmp_path / "mixed"
    publish_experts(mixed, {c: trained[c, n] for c, n in PINNED.items()}, prepare_data(config.data))
    experts = {e.meta.culture: e for e in load_experts(mixed)}
    assert {c: e.prompt.shape[0] for c, e in experts.items()} == PINNED
    file_versions = {
        c: "sha256:" + hashlib.sha256((mixed / f"{slug(c)}.safetensors").read_bytes()).hexdigest()[:12]
        for c in PINNED
    }

    # Served together: one pool, one bank of both lengths.
    serving = load_config(
        TINY_CONFIG, [*sets, f"serve.deployment.experts_dir={mixed}", "serve.limits.max_batch_size=8"]
    )
    with local_serve(serving, num_cpus=2) as url, client(url) as http:
        served = {e["culture"]: e["version"] for e in http.get("/v1/experts").json()["experts"]}
        assert served == file_versions  # exactly the pinned files, of lengths 4 and 8
        alone = {}
        for culture in PINNED:
            answer = http.post("/v1/opinion", json=QUESTION | {"culture": culture})
            assert answer.status_code == 200, answer.text
            alone[culture] = np.array(answer.json()["distribution"])
            assert abs(alone[culture].sum() - 1) < 1e-6
        # Canada has no expert: a committee of both, one row of each length in one batch.
        canada = http.post("/v1/opinion", json=QUESTION | {"culture": "Canada"})
        assert canada.status_code == 200, canada.text
        members = {m["culture"]: m["weight"] for m in canada.json()["committee"]}
        assert set(members) == set(PINNED)
        mix = sum(w * alone[c] for c, w in members.items())
        assert np.allclose(canada.json()["distribution"], mix, atol=1e-5)
        for path, body in [
            ("/v1/generate", {"prompt": "Do you trust", "culture": "Canada", "max_new_tokens": 4}),
            ("/v1/generate", {"prompt": "Do you trust", "culture": "Japan", "max_new_tokens": 4}),
            (
                "/v1/chat/completions",
                {"model": "shores:germany", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            ),
        ]:
            response = http.post(path, json=body)
            assert response.status_code == 200, response.text
            assert {m["version"] for m in response.json()["committee"]} <= set(file_versions.values())

    # Evaluated together: every culture of the config, the held-out one by a committee of both lengths.
    report_path = tmp_path / "report.json"
    overrides = [arg for s in sets for arg in ("--set", s)]
    command = [
        "eval",
        "--config",
        str(TINY_CONFIG),
        *overrides,
        "--experts",
        str(mixed),
        "--out",
        str(report_path),
    ]
    assert shores(command) == 0
    report = json.loads(report_path.read_text())["cultures"]
    assert set(report) == {"Germany", "Japan", "Canada"}
    for culture in PINNED:
        assert report[culture]["expert"] is not None and report[culture]["committee"] is not None
    assert report["Canada"]["expert"] is None and report["Canada"]["committee"] is not None
