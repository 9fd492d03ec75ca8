"""Experts of different prompt lengths, end to end: a search over num_virtual_tokens, then served and evaluated
together (one prompt bank, one batch, committees that mix lengths).

Which length wins a culture is the validation's choice, so a search alone may publish one length only. To
serve both lengths every time, the test pins the winners: from the search's own checkpoints it publishes
Germany's 4-token expert and Japan's 8-token one with the same `publish_experts` that training uses.
`test_search.py` covers choosing winners by validation; this test covers what comes after with mixed lengths.
"""

import hashlib
import json

import numpy as np
import ray
from ray import tune

from orchestrator.cli import main as shores
from orchestrator.config import load_config
from orchestrator.publish import publish_experts
from orchestrator.results import Winner, finished_trials
from orchestrator.survey import prepare_data
from orchestrator.train import train
from orchestrator.tune import experiment_path, run_trial
from tests.conftest import OPINIONS, REPO
from tests.serving import client, local_serve
from workers.cultures import slug
from workers.expert_store import load_experts

TINY = REPO / "tests" / "tiny.yaml"
PINNED = {"Germany": 4, "Japan": 8}
QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}


def test_experts_of_lengths_4_and_8_train_serve_and_evaluate_together(llama_dir, tmp_path):
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
    config = load_config(TINY, sets)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = train(config)
        trials = finished_trials(tune.Tuner.restore(experiment_path(config), run_trial).get_results())
    finally:
        ray.shutdown()
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
        TINY, [*sets, f"serve.deployment.experts_dir={mixed}", "serve.limits.max_batch_size=8"]
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
    command = ["eval", "--config", str(TINY), *overrides, "--experts", str(mixed), "--out", str(report_path)]
    assert shores(command) == 0
    report = json.loads(report_path.read_text())["cultures"]
    assert set(report) == {"Germany", "Japan", "Canada"}
    for culture in PINNED:
        assert report[culture]["expert"] is not None and report[culture]["committee"] is not None
    assert report["Canada"]["expert"] is None and report["Canada"]["committee"] is not None
