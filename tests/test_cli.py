"""The `shores` command line end to end on a tiny model: train --local, eval, and one-line errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from tests.conftest import OPINIONS, REPO, SHARED_DATA, TINY_CONFIG
from workers.expert_file import load_expert, save_expert
from workers.renderings import RENDERINGS

SQRT_LN2 = math.sqrt(math.log(2))


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
    result = shores("train", "--local", "--config", str(TINY_CONFIG), *args)
    assert result.returncode == 0, result.stderr
    return out, args, result


@pytest.mark.slow
def test_train_local_saves_one_expert_and_adapter_per_culture(trained):
    out, _, result = trained
    assert "saved 3 experts" in result.stdout
    assert "epoch  1  Germany" in result.stdout
    for slug in ("germany", "japan", "kenya"):
        assert (out / "experts" / f"{slug}.safetensors").exists()
        assert (out / "experts" / "peft" / slug / "adapter_config.json").exists()
    similarity = json.loads((out / "experts" / "similarity.json").read_text())
    assert set(similarity["Canada"]) == {"Germany", "Japan", "Kenya"}


@pytest.mark.slow
def test_eval_writes_the_report_contract_table_and_chart(trained):
    out, args, _ = trained
    report_path = out / "report.json"
    result = shores("eval", "--config", str(TINY_CONFIG), *args, "--split", "test", "--out", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert set(report["cultures"]) == {"Germany", "Japan", "Kenya", "Canada"}
    canada = report["cultures"]["Canada"]
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
    # No shared prior among the experts: its column and its differences are empty, and shown as `-`.
    assert all(row["shared"] is None for row in report["cultures"].values())
    assert report["overall"]["differences"]["expert-shared"] is None
    assert report["overall"]["differences"]["expert-base"]["n"] == report["overall"]["n"] - canada["n"]
    germany_line = next(line for line in result.stdout.splitlines() if line.startswith("Germany"))
    assert germany_line.split()[4] == "-"  # culture, n, base, persona, shared
    assert report["split"] == "test" and report["notes"] == []


def test_a_report_of_many_cultures_charts_them_in_rows_not_one_strip(tmp_path):
    import matplotlib.pyplot as plt

    from orchestrator.evaluate import METHODS
    from orchestrator.report_view import PLOT_ROW, plot_report

    row = {m: 0.6 for m in METHODS} | {"ci95": {m: [0.5, 0.7] for m in METHODS}}
    shapes = []
    for n in (4, 3 * PLOT_ROW):
        report = {"split": "test", "cultures": {f"culture {i}": row for i in range(n)}, "overall": row}
        shapes.append(plt.imread(plot_report(report, tmp_path / f"{n}.png")).shape)
    (few_h, few_w, _), (many_h, many_w, _) = shapes
    assert many_h > 3 * few_h and many_w < 4 * few_w  # four rows of ~12, not 49 in a line


def with_shared_prior(experts: Path, to: Path, like: str = "germany") -> Path:
    """A copy of a folder of experts plus a shared prior: for the test, one culture's prompt re-labelled."""
    shutil.copytree(experts, to)
    prior = load_expert(experts / f"{like}.safetensors")
    prior.meta.culture, prior.meta.iso, prior.meta.descriptor = "shared", "", "any survey respondent"
    save_expert(to / "shared.safetensors", prior)
    return to


@pytest.mark.slow
def test_eval_scores_the_shared_prior_on_every_record_with_paired_differences(trained, tmp_path):
    out, args, _ = trained
    experts = with_shared_prior(out / "experts", tmp_path / "experts")
    report_path = tmp_path / "report.json"
    result = shores(
        "eval", "--config", str(TINY_CONFIG), *args, "--experts", str(experts), "--out", str(report_path)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    cultures = report["cultures"]
    assert set(cultures) == {"Germany", "Japan", "Kenya", "Canada"}  # the prior is no culture of the report
    for culture, row in cultures.items():
        assert 0 < row["shared"] <= 1 and "shared" in row["ci95"]  # every record, held-out ones too
        if culture == "Canada":  # its committee comes from the culture experts alone
            assert row["expert"] is None
            assert row["differences"]["expert-shared"] is None and row["differences"]["expert-base"] is None
            committee = row["differences"]["committee-shared"]  # its committee against the prior, paired
            assert committee["n"] == row["n"]
            assert committee["mean"] == pytest.approx(row["committee"] - row["shared"], abs=1e-9)
            assert report["held_out"]["shared"] == row["shared"]
            continue
        for name, baseline in (("expert-shared", "shared"), ("expert-base", "base")):
            entry = row["differences"][name]
            assert entry["n"] == row["n"]
            assert entry["mean"] == pytest.approx(row["expert"] - row[baseline], abs=1e-9)
            assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    # The prior here is Germany's own prompt: on Germany's records the paired difference is nothing at all.
    same = cultures["Germany"]["differences"]["expert-shared"]
    assert same["mean"] == pytest.approx(0, abs=1e-6) and same["ci95"] == pytest.approx([0, 0], abs=1e-6)
    assert cultures["Germany"]["committee"] == cultures["Germany"]["expert"]

    overall = report["overall"]
    pooled = overall["differences"]["expert-shared"]  # over the cultures that have experts
    assert pooled["n"] == sum(cultures[c]["n"] for c in ("Germany", "Japan", "Kenya"))
    assert overall["n"] == pooled["n"] + cultures["Canada"]["n"]
    for method, value in overall["natural_log"].items():
        assert value == pytest.approx(1 - SQRT_LN2 * (1 - overall[method]))
    assert set(overall["natural_log"]) == {m for m in overall["natural_log"] if overall[m] is not None}
    assert "shared" in report["experts"]

    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["culture", "n", "base", "persona", "shared"]
    assert any(line.startswith("overall, natural log") for line in lines)
    header = next(line for line in lines if line.startswith("paired difference"))
    assert "expert - shared" in header and "expert - base" in header
    assert any(line.startswith("overall (with experts)") and "[" in line for line in lines)


def opinions_of(*cultures: str, per_culture: int = 6) -> list[str]:
    """The first records of each culture in the shared survey file, as JSON lines."""
    lines, kept = [], dict.fromkeys(cultures, 0)
    for line in OPINIONS.read_text().splitlines():
        country = json.loads(line)["country"]
        if kept.get(country, per_culture) < per_culture:
            kept[country] += 1
            lines.append(line)
    return lines


@pytest.mark.slow
def test_eval_on_a_foreign_file_scores_the_experts_cultures_it_holds(trained, tmp_path):
    out, args, _ = trained
    foreign = tmp_path / "foreign.jsonl"
    # Germany and Japan have experts, France has none and is not held out; Kenya and Canada are absent.
    foreign.write_text("\n".join(opinions_of("Germany", "Japan", "France")) + "\n")
    report_path = tmp_path / "foreign.json"
    result = shores(
        "eval", "--config", str(TINY_CONFIG), *args, "--data", str(foreign), "--out", str(report_path)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert set(report["cultures"]) == {"Germany", "Japan"} and "held_out" not in report
    assert report["split"] == "all" and report["data"] == str(foreign)
    # Its MLflow run is named for the file and split, and the file is a param: questionnaires tell apart.
    assert "logged to MLflow: run eval-foreign-all (" in result.stdout
    assert report["data_file"] == str(foreign)
    assert set(report["renderings"]) == set(RENDERINGS)
    assert report["cultures"]["Germany"]["n"] == report["cultures"]["Japan"]["n"] == 6  # every record
    assert report["cultures"]["Japan"]["expert"] is not None
    skipped = f"note: no records in {foreign} for Kenya (expert), Canada (held out): skipped"
    assert skipped in result.stderr
    assert "not held out): France" in result.stderr and report["notes"][0].endswith("skipped")

    # The original GlobalOpinionQA CSV loads too; one record each of Germany and Japan, every split.
    sample = SHARED_DATA / "format-sample.csv"
    result = shores(
        "eval", "--config", str(TINY_CONFIG), *args, "--data", str(sample), "--out", str(report_path)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert {c: r["n"] for c, r in report["cultures"].items()} == {"Germany": 1, "Japan": 1}
    assert "not held out): Brazil, Egypt, Mexico, Nigeria" in result.stderr


@pytest.mark.slow
def test_eval_on_a_bad_foreign_file_is_one_line_and_nonzero(trained, tmp_path):
    _, args, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"country": "Germany", "question": "q?"\n')
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("\n".join(opinions_of("France", "Peru")) + "\n")
    for path, message in [
        (bad, "bad.jsonl: no usable survey records (read 1 records, skipped malformed 1)"),
        (elsewhere, "holds no records of the experts' cultures (Germany, Japan, Kenya) or the held-out"),
        (tmp_path / "nope.jsonl", "no such file"),
    ]:
        result = shores(
            "eval", "--config", str(TINY_CONFIG), *args, "--data", str(path), "--out", str(tmp_path / "r")
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith(
            "shores eval"
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "train.lrr: Extra inputs are not permitted"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("data.top=3", "give at most one of data.cultures or data.top"),
        ("base_model.dtype=int4", "base_model.dtype"),
        ("serve.limits.max_new_tokens=0", "serve.limits.max_new_tokens: Input should be greater than"),
        (
            "serve.routing.committee_size=9",
            "serve.routing.committee_size is over serve.limits.max_committee_size",
        ),
    ],
)
def test_bad_config_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(TINY_CONFIG, [override])


def test_serve_keys_load_from_their_groups():
    config = load_config(
        TINY_CONFIG,
        [
            "serve.deployment.port=8100",
            "serve.limits.max_new_tokens=32",
            "serve.limits.default_max_new_tokens=8",
            "serve.routing.committee_size=2",
            "serve.auth.cors_origins=[https://app.example]",
        ],
    )
    serve = config.serve
    assert (serve.deployment.port, serve.limits.max_new_tokens, serve.limits.default_max_new_tokens) == (
        8100,
        32,
        8,
    )
    assert serve.routing.committee_size == 2 and serve.auth.cors_origins == ["https://app.example"]
    assert serve.deployment.host == "127.0.0.1" and serve.limits.max_batch_size == 16  # the rest: defaults


@pytest.mark.parametrize(
    "serve, message",
    [
        ({"max_new_tokens": 5}, "serve.max_new_tokens moved to serve.limits.max_new_tokens"),
        ({"host": "0.0.0.0"}, "serve.host moved to serve.deployment.host"),
        ({"committee_size": 2}, "serve.committee_size moved to serve.routing.committee_size"),
        ({"api_key_env": "KEY"}, "serve.api_key_env moved to serve.auth.api_key_env"),
        (
            {"batch_wait_timeout_s": 0.01},
            "serve.batch_wait_timeout_s was removed: the pool batches continuously",
        ),
    ],
)
def test_an_old_flat_serve_key_is_refused_in_one_line_naming_its_new_place(tmp_path, serve, message):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(TINY_CONFIG.read_text()) | {"serve": serve}))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}: serve: {message}"


@pytest.mark.slow  # `shores` in subprocesses, each importing the model stack
def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad = shores("train", "--local", "--config", str(TINY_CONFIG), "--set", "train.epochz=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "train.epochz" in bad.stderr
    assert "Traceback" not in bad.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text(
        '{"country": "Germany", "question": "q", "options": ["a", "b"], "distribution": [0, 0]}\n'
    )
    nodata = shores("train", "--local", "--config", str(TINY_CONFIG), "--set", f"data.path={empty}")
    assert nodata.returncode == 2 and "zero_sum 1" in nodata.stderr and "Traceback" not in nodata.stderr

    missing = shores("train", "--local", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


@pytest.mark.slow  # `shores` in subprocesses, each importing the model stack
def test_eval_without_experts_says_so(tiny_model_dirs, tmp_path):
    sets = ["--set", f"base_model.name={tiny_model_dirs['llama']}", "--set", f"data.path={OPINIONS}"]
    result = shores(
        "eval",
        "--config",
        str(TINY_CONFIG),
        *sets,
        "--experts",
        str(tmp_path),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert result.returncode == 2 and "no experts" in result.stderr


@pytest.mark.slow
def test_train_local_trains_the_prior_first_and_adds_to_the_published_set(tiny_model_dirs, tmp_path):
    sets = [f"base_model.name={tiny_model_dirs['llama']}", f"output_dir={tmp_path}", f"data.path={OPINIONS}"]
    sets += ["train.epochs=1", "data.cultures=[Germany, Japan]"]
    shared = ["shared.enabled=true", "prompt.init=shared", "shared.max_questions=20"]
    shared += ["shared.expert_prior_weight=auto"]
    args = [x for s in sets + shared for x in ("--set", s)]
    first = shores("train", "--local", "--config", str(TINY_CONFIG), *args)
    assert first.returncode == 0, first.stderr[-2000:]
    # The prior trains alone, then every culture's expert starts from it.
    assert first.stdout.index("epoch  1  shared") < first.stdout.index("epoch  1  Germany")
    experts = tmp_path / "experts"
    assert experts.is_symlink()  # published through the same atomic swap as under Tune
    assert sorted(p.stem for p in experts.glob("*.safetensors")) == ["germany", "japan", "shared"]
    assert "shared" not in json.loads((experts / "similarity.json").read_text())["Canada"]
    # Each expert's share of the prior is in its published file, fitted on every rendering of val.
    for culture in ("Germany", "Japan"):
        line = next(x for x in first.stdout.splitlines() if x.startswith(f"{culture}: the prior's weight"))
        assert f" val records in {len(RENDERINGS)} renderings" in line
        fitted = float(line.split("weight ")[1].split(",")[0])
        assert load_expert(experts / f"{culture.lower()}.safetensors").meta.prior_weight == fitted
    # Committees take their members' own shares: the prior's file adds none.
    assert load_expert(experts / "shared.safetensors").meta.prior_weight == 0.0

    kenya = [x for s in [*sets[:3], "train.epochs=1", "data.cultures=[Kenya]"] for x in ("--set", s)]
    added = shores("train", "--local", "--config", str(TINY_CONFIG), *kenya)
    assert added.returncode == 0, added.stderr[-2000:]
    assert sorted(p.stem for p in experts.glob("*.safetensors")) == ["germany", "japan", "kenya", "shared"]
    similarity = json.loads((experts / "similarity.json").read_text())
    assert set(similarity["Canada"]) == {"Germany", "Japan", "Kenya"}

    alone = shores("train", "--local", "--replace", "--config", str(TINY_CONFIG), *kenya)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert sorted(p.stem for p in experts.glob("*.safetensors")) == ["kenya"]
