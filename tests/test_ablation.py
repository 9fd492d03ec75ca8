"""The ablation of prompt designs (bench/experiments/ablation.py), end to end on a tiny model."""

import json

import numpy as np
import pytest

from tests.conftest import OPINIONS, TINY_CONFIG
from workers.cultures import SHARED

pytestmark = pytest.mark.slow  # it trains a prior and experts on it


def test_the_ablation_scores_each_design_against_the_prior_on_the_same_records(llama_dir, tmp_path):
    from bench.experiments import ablation

    out = tmp_path / "ablation.json"
    ablation.main(
        [
            "--config",
            str(TINY_CONFIG),
            "--set",
            f"base_model.name={llama_dir}",
            "--set",
            f"data.path={OPINIONS}",
        ]
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
