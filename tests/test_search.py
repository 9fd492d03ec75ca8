"""The search space in Tune's forms, a seed per sample, and each culture's winner across the whole search."""

import pytest
import ray
from pydantic import ValidationError
from ray import tune

from orchestrator.config import ConfigError, load_config
from orchestrator.survey import prepare_data
from orchestrator.tracking import TRIAL_TAG, Store
from orchestrator.train import train
from orchestrator.trial import trial_config
from orchestrator.tune import expected_trials, param_space, run_trial
from tests.conftest import OPINIONS, REPO
from tests.test_tune import tiny_config
from workers.expert_store import load_experts

TINY = REPO / "tests" / "tiny.yaml"


def config_with(*sets):
    return load_config(TINY, ["base_model.name=unused", f"data.path={OPINIONS}", *sets])


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


def test_the_better_learning_rate_wins_for_every_culture(llama_dir, tmp_path):
    # One group of two cultures, two learning rates: one that learns and one that cannot move the prompt.
    config = load_config(
        TINY,
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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = train(config)
    finally:
        ray.shutdown()
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


def test_asha_stops_a_clearly_worse_trial_and_each_culture_wins_in_its_own_trial(llama_dir, tmp_path):
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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = train(config)
        results = tune.Tuner.restore(str(tmp_path / "tune" / "tiny"), run_trial).get_results()
    finally:
        ray.shutdown()
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
