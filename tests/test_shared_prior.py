"""The shared survey prior: one culture-blind expert trained on every country's answers, whatever the selection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.survey import load_survey, normalise_question, prepare_data
from orchestrator.survey.pooling import pooled_records, sample_questions
from orchestrator.tracking import Store
from orchestrator.train import train
from tests.conftest import OPINIONS, REPO
from workers.cultures import SHARED
from workers.expert_store import SIMILARITY_FILE, load_experts, registered_experts

TINY = REPO / "tests" / "tiny.yaml"


def config_with(*sets):
    return load_config(TINY, ["base_model.name=unused", f"data.path={OPINIONS}", *sets])


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


@pytest.mark.parametrize("key", ["data.cultures=[Germany, shared]", "data.held_out=[Shared]"])
def test_shared_is_no_culture_name(key):
    with pytest.raises(ConfigError, match="reserved"):
        config_with(key)


def train_with_prior(llama_dir, tmp_path, *sets):
    """`shores train` of the tiny config with a 16-question prior and one epoch, on a local Ray."""
    config = load_config(
        TINY,
        [
            f"base_model.name={llama_dir}",
            f"output_dir={tmp_path}",
            f"data.path={OPINIONS}",
            "shared.enabled=true",
            "shared.max_questions=16",
            "train.epochs=1",
            *sets,
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return config, train(config)
    finally:
        ray.shutdown()


def test_tune_trains_registers_and_publishes_the_prior_beside_the_experts(llama_dir, tmp_path):
    config, outcome = train_with_prior(llama_dir, tmp_path, "data.cultures=[Germany]")
    assert outcome.experts == ["Germany", SHARED]
    experts = {e.meta.culture: e for e in load_experts(tmp_path / "experts")}
    assert set(experts) == {"Germany", SHARED}
    assert "most people around the world" in experts[SHARED].meta.descriptor
    similarity = json.loads((tmp_path / "experts" / SIMILARITY_FILE).read_text())
    assert all(SHARED not in row for row in similarity.values())  # committees never draw the prior
    registered = {r["culture"] for r in registered_experts(Store.from_config(config))}
    assert registered == {"Germany", SHARED}


@pytest.mark.parametrize("kind", ["input", "deep"])
def test_init_shared_trains_the_prior_first_and_starts_every_expert_from_it(kind, llama_dir, tmp_path):
    _, outcome = train_with_prior(
        llama_dir,
        tmp_path,
        "data.cultures=[Germany, Japan]",
        "prompt.init=shared",
        f"prompt.kind={kind}",
        "shared.cpus_per_trial=2",
        "train.lr=1e-9",  # no step moves a prompt: each expert is exactly where it started
    )
    assert outcome.experts == ["Germany", "Japan", SHARED]
    assert (tmp_path / "tune" / f"tiny-{SHARED}").is_dir()  # the prior's own stage, resumable on its own
    experts = {e.meta.culture: e for e in load_experts(tmp_path / "experts")}
    assert experts[SHARED].meta.kind == kind
    for culture in ("Germany", "Japan"):
        assert torch.allclose(experts[culture].prompt, experts[SHARED].prompt, atol=1e-6)
        if kind == "deep":
            assert torch.allclose(experts[culture].prefix, experts[SHARED].prefix, atol=1e-6)


def test_experts_on_the_prior_may_train_only_its_top_layers(llama_dir, tmp_path):
    config, outcome = train_with_prior(
        llama_dir,
        tmp_path,
        "data.cultures=[Germany, Japan]",
        "prompt.init=shared",
        "prompt.kind=deep",
        "shared.cpus_per_trial=2",
        "train.prefix_layers=1",
        "shared.train={prefix_layers: null}",  # the prior itself learns at every layer
    )
    assert config.shared.train.model_dump() == {"prefix_layers": None}
    experts = {e.meta.culture: e for e in load_experts(tmp_path / "experts")}
    for culture in ("Germany", "Japan"):
        # Below the top layer an expert is the prior, bit for bit.
        assert torch.equal(experts[culture].prefix[:, :-1], experts[SHARED].prefix[:, :-1])


def test_init_shared_needs_the_prior():
    with pytest.raises(ConfigError, match="shared.enabled"):
        config_with("prompt.init=shared")


def test_the_ablation_scores_each_design_against_the_prior_on_the_same_records(llama_dir, tmp_path):
    from bench.experiments import ablation

    out = tmp_path / "ablation.json"
    ablation.main(
        ["--config", str(TINY), "--set", f"base_model.name={llama_dir}", "--set", f"data.path={OPINIONS}"]
        + ["--kinds", "deep", "--lengths", "2", "--variants", "from_shared", "--prefix-layers", "all", "1"]
        + ["--prior-questions", "16", "--prior-epochs", "1", "--epochs", "1", "--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["prefix_layers"]) for r in rows] == [
        (SHARED, "all"),
        ("from_shared", "all"),
        ("from_shared", 1),
    ]
    for row in rows[1:]:
        for split in ("val", "test"):
            low, high = row[f"{split}_gain_ci"]
            assert low <= row[f"{split}_gain"] <= high
            prior = np.mean(list(rows[0][f"{split}_by_culture"].values()))
            assert 0 <= row[f"{split}_above_prior"] <= 3 and np.isfinite(prior)


def shores_train(sets: list[str], *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`shores train` in its own process (Ctrl-C reaches only it), with SHORES_FAULT set or unset."""
    env = {k: v for k, v in os.environ.items() if k != "SHORES_FAULT"} | {"PYTHONUNBUFFERED": "1"}
    if fault:
        env["SHORES_FAULT"] = fault
    args = [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(TINY), *extra]
    args += [x for s in sets for x in ("--set", s)]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def trial_results(experiment: Path) -> dict[int, str]:
    """Each trial's result.json (one line an epoch), by its culture group."""
    return {
        json.loads((p.parent / "params.json").read_text())["group"]: p.read_text()
        for p in experiment.glob("*/result.json")
    }


def checkpoint_epochs(experiment: Path, group: int) -> list[tuple[int, int]]:
    """(epoch, pid of the process that trained it) of each checkpoint the driver registered for a trial."""
    from ray import tune

    from orchestrator.tune import run_trial

    results = tune.Tuner.restore(str(experiment), run_trial).get_results()
    trial = next(r for r in results if r.config["group"] == group)
    return sorted((int(m["epoch"]), int(m["pid"])) for _, m in trial.best_checkpoints)


def test_the_two_stage_run_resumes_after_an_interrupt_in_each_stage(llama_dir, tmp_path):
    sets = [
        f"base_model.name={llama_dir}",
        f"output_dir={tmp_path}",
        f"data.path={OPINIONS}",
        "data.cultures=[Germany, Japan]",
        "shared.enabled=true",
        "shared.max_questions=16",
        "prompt.init=shared",
        "tune.experts_per_trial=1",
        "tune.max_concurrent_trials=1",
        "tune.scheduler=fifo",
    ]  # two epochs a trial (tiny.yaml)
    prior_stage, cultures_stage = tmp_path / "tune" / f"tiny-{SHARED}", tmp_path / "tune" / "tiny"

    # 1. Ctrl-C once the driver has the prior's epoch-1 checkpoint: the cultures' stage never starts.
    first = shores_train(sets, fault="interrupt-after-epoch:0:1")
    assert first.returncode == 130, (first.stdout + first.stderr)[-3000:]
    assert "interrupted" in first.stdout and "warning: SHORES_FAULT is set" in first.stderr
    assert not cultures_stage.exists() and not (tmp_path / "experts").exists()

    # 2. Resumed: the prior finishes from its checkpoint, then Ctrl-C once the driver has the epoch-1
    # checkpoint of Japan's trial (group 1 of the cultures' stage; Germany's, group 0, runs first).
    second = shores_train(sets, "--resume", fault="interrupt-after-epoch:1:1")
    assert second.returncode == 130, (second.stdout + second.stderr)[-3000:]
    assert "interrupted" in second.stdout and not (tmp_path / "experts").exists()
    prior, germany = trial_results(prior_stage)[0], trial_results(cultures_stage)[0]

    # 3. Resumed again: only Japan's trial trains, from its epoch-1 checkpoint.
    third = shores_train(sets, "--resume")
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert trial_results(prior_stage)[0] == prior and trial_results(cultures_stage)[0] == germany
    for stage, group in ((prior_stage, 0), (cultures_stage, 1)):
        (one, pid_one), (two, pid_two) = checkpoint_epochs(stage, group)
        assert (one, two) == (1, 2) and pid_one != pid_two  # epoch 2 continued epoch 1's checkpoint, later
    experts = {e.meta.culture: e for e in load_experts(tmp_path / "experts")}
    assert set(experts) == {"Germany", "Japan", SHARED}
    assert all(e.meta.training["epochs_run"] == 2 for e in experts.values())
