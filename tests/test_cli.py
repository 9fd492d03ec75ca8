"""The `shores` command line end to end on a tiny model: train --local, eval, and one-line errors."""

import json
import subprocess
import sys

import pytest

from orchestrator.config import ConfigError, load_config
from tests.conftest import OPINIONS, REPO

TINY = REPO / "configs" / "tiny.yaml"


def shores(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    sets = [f"base_model.name={tiny_model_dirs['llama']}", f"output_dir={out}", f"data.path={OPINIONS}"]
    args = [x for s in sets for x in ("--set", s)]
    result = shores("train", "--local", "--config", str(TINY), *args)
    assert result.returncode == 0, result.stderr
    return out, args, result


def test_train_local_saves_one_expert_and_adapter_per_culture(trained):
    out, _, result = trained
    assert "saved 3 experts" in result.stdout
    assert "epoch  1  Germany" in result.stdout
    for slug in ("germany", "japan", "kenya"):
        assert (out / "experts" / f"{slug}.safetensors").exists()
        assert (out / "experts" / "peft" / slug / "adapter_config.json").exists()
    similarity = json.loads((out / "experts" / "similarity.json").read_text())
    assert set(similarity["Canada"]) == {"Germany", "Japan", "Kenya"}


def test_eval_writes_the_report_contract_table_and_chart(trained):
    out, args, _ = trained
    report_path = out / "report.json"
    result = shores("eval", "--config", str(TINY), *args, "--split", "test", "--out", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert set(report["cultures"]) == {"Germany", "Japan", "Kenya", "Canada"}
    for culture, row in report["cultures"].items():
        assert row["n"] > 0
        for method in ("base", "persona", "uniform", "agnostic"):
            assert 0 < row[method] <= 1
        if culture == "Canada":  # held out: no expert of its own
            assert row["expert"] is None
        else:
            assert 0 < row["expert"] <= 1 and row["committee"] == row["expert"]
    assert report["overall"]["n"] == sum(r["n"] for r in report["cultures"].values())
    assert report_path.with_suffix(".png").stat().st_size > 10_000
    assert "overall" in result.stdout and "committee" in result.stdout.splitlines()[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "train.lrr: Extra inputs are not permitted"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("data.top=3", "give at most one of data.cultures or data.top"),
        ("base_model.dtype=int4", "base_model.dtype"),
    ],
)
def test_bad_config_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(TINY, [override])


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad = shores("train", "--local", "--config", str(TINY), "--set", "train.epochz=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "train.epochz" in bad.stderr
    assert "Traceback" not in bad.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text(
        '{"country": "Germany", "question": "q", "options": ["a", "b"], "distribution": [0, 0]}\n'
    )
    nodata = shores("train", "--local", "--config", str(TINY), "--set", f"data.path={empty}")
    assert nodata.returncode == 2 and "zero_sum 1" in nodata.stderr and "Traceback" not in nodata.stderr

    missing = shores("train", "--local", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_eval_without_experts_says_so(tiny_model_dirs, tmp_path):
    sets = ["--set", f"base_model.name={tiny_model_dirs['llama']}", "--set", f"data.path={OPINIONS}"]
    result = shores(
        "eval", "--config", str(TINY), *sets, "--experts", str(tmp_path), "--out", str(tmp_path / "r.json")
    )
    assert result.returncode == 2 and "no experts" in result.stderr
