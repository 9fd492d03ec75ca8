"""The champion gate on a real sqlite MLflow store and a tiny model: validation alignments compared like with like."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.encoding import encode
from orchestrator.expert_bank import save_experts
from orchestrator.gate import RESCORED_CHAMPION_SCORE_TAG, RESCORED_CHAMPION_TAG, RESCORED_TAG
from orchestrator.results import FinishedTrial, Winner
from orchestrator.survey import prepare_data
from orchestrator.tracking import ExperimentTracker
from tests.conftest import OPINIONS, TINY_CONFIG
from workers.base_model import load_frozen_base
from workers.expert_file import load_expert, save_expert
from workers.expert_store import CHAMPION
from workers.prompts import SoftPromptBank, bank_from_experts
from workers.scoring import mean_alignment


@pytest.fixture(scope="module")
def base(llama_dir):
    return load_frozen_base(str(llama_dir), device="cpu")


def config_of(llama_dir, out: Path, data: Path = OPINIONS, salt: str = ""):
    sets = [
        f"base_model.name={llama_dir}",
        f"output_dir={out}",
        f"data.path={data}",
        "data.cultures=[Germany]",
    ]
    return load_config(TINY_CONFIG, [*sets, f"data.split_salt={salt!r}"])


def trained(base, config, trial_id: str, seed: int, stored: float, fingerprint: bool = True):
    """Germany's expert as a trial of `config` leaves it (random prompt, `stored` validation alignment)."""
    folder = Path(config.output_dir) / "trials" / trial_id
    bank = SoftPromptBank.initialise(base, ["Germany"], 4, "random", seed=seed)
    data = prepare_data(config.data)
    (path,) = save_experts(folder, bank, base, data, {"Germany": {"val_alignment": stored}})
    if not fingerprint:  # an expert from before fingerprints
        expert = load_expert(path)
        training = {k: v for k, v in expert.meta.training.items() if k != "data"}
        save_expert(path, replace(expert, meta=replace(expert.meta, training=training)))
    history = [{"epoch": 1, "val_gain": 0.0, "val_alignment/Germany": stored}]
    return FinishedTrial(trial_id, folder, {}, history), {
        "Germany": Winner("Germany", trial_id, folder, stored)
    }


def register(tracker, trial_and_winners):
    (row,) = tracker.record([trial_and_winners[0]], trial_and_winners[1])
    return row


def champion(tracker) -> str:
    client = tracker.store.client()
    return str(client.get_registered_model("shores-germany").aliases[CHAMPION])


def no_base():
    raise AssertionError("the base was loaded: experts on the same validation records were re-scored")


@pytest.mark.parametrize("stored, promoted", [(0.7, True), (0.5, False)])
def test_the_same_validation_questions_compare_stored_scores(llama_dir, base, tmp_path, stored, promoted):
    config = config_of(llama_dir, tmp_path)
    tracker = ExperimentTracker(config, base=no_base)
    first = register(tracker, trained(base, config, "t1", seed=1, stored=0.6))
    second = register(tracker, trained(base, config, "t2", seed=2, stored=stored))
    assert (first.version, second.version, second.champion) == (1, 2, promoted)
    assert champion(tracker) == ("2" if promoted else "1")
    tags = tracker.store.client().get_model_version("shores-germany", "2").tags
    # The fingerprint is on the version, readable: the file, its hash, the split, the validation records.
    assert tags["data.survey"] == str(OPINIONS.resolve()) and len(tags["data.sha256"]) == 64
    assert json.loads(tags["data.split"]) == [0.7, 0.15, 0.15] and tags["data.split_salt"] == ""
    assert int(tags["data.val_questions"]) > 5 and RESCORED_TAG not in tags


def other_answers(path: Path, out: Path) -> Path:
    """The survey file with Germany's answers reversed: the same questions, other validation records."""
    lines = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("country") == "Germany":
            row["distribution"] = row["distribution"][::-1]
        lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("change", ["split salt", "survey file", "champion without fingerprint"])
@pytest.mark.parametrize("stored", [(0.9, 0.1), (0.1, 0.9)])  # (champion, challenger) as registered
def test_other_data_is_re_scored_on_the_challengers_split_and_decides(
    llama_dir, base, tmp_path, capsys, change, stored
):
    champion_config = config_of(llama_dir, tmp_path)
    challenger_config = {
        "split salt": config_of(llama_dir, tmp_path, salt="wave-2"),
        "survey file": config_of(llama_dir, tmp_path, data=other_answers(OPINIONS, tmp_path / "wave2.jsonl")),
        "champion without fingerprint": champion_config,
    }[change]
    tracker = ExperimentTracker(champion_config, base=lambda: base)
    legacy = change == "champion without fingerprint"
    register(tracker, trained(base, champion_config, "t1", seed=1, stored=stored[0], fingerprint=not legacy))
    challenger = trained(base, challenger_config, "t2", seed=2, stored=stored[1])

    # What each expert scores on the challenger's validation split, measured here on its own.
    records = prepare_data(challenger_config.data).records_of("val", ["Germany"])["Germany"]
    questions = encode(base, records, challenger_config.data.max_length)
    files = [tmp_path / "trials" / t / "germany.safetensors" for t in ("t1", "t2")]
    bank = bank_from_experts([load_expert(f) for f in files])
    theirs, mine = (mean_alignment(base, bank, questions, i) for i in range(2))
    assert abs(mine - theirs) > 1e-6

    row = register(tracker, challenger)
    # The decision follows the scores on the challenger's split, whichever way the stored scores point:
    # in one of the two orders they disagree with them.
    assert row.champion == (mine > theirs)
    assert champion(tracker) == ("2" if mine > theirs else "1")
    tags = tracker.store.client().get_model_version("shores-germany", "2").tags
    assert float(tags[RESCORED_TAG]) == pytest.approx(mine, abs=1e-4)
    assert float(tags[RESCORED_CHAMPION_SCORE_TAG]) == pytest.approx(theirs, abs=1e-4)
    assert tags[RESCORED_CHAMPION_TAG] == "1"
    line = next(line for line in capsys.readouterr().out.splitlines() if "validated on other data" in line)
    assert f"v2 {mine:.4f}" in line and f"champion v1 {theirs:.4f}" in line


def test_a_split_that_cannot_be_rebuilt_keeps_the_champion_and_says_why(llama_dir, base, tmp_path):
    survey = other_answers(OPINIONS, tmp_path / "wave2.jsonl")
    champion_config = config_of(llama_dir, tmp_path)
    tracker = ExperimentTracker(champion_config, base=lambda: base)
    register(tracker, trained(base, champion_config, "t1", seed=1, stored=0.1))
    challenger = trained(base, config_of(llama_dir, tmp_path, data=survey), "t2", seed=2, stored=0.9)
    survey.unlink()  # gone before registration: its validation split cannot be rebuilt
    row = register(tracker, challenger)
    assert not row.champion and champion(tracker) == "1"
    assert "validation split cannot be rebuilt" in row.note and "no such file" in row.note
