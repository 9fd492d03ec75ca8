"""Reviewing an experiment in MLflow: its evaluation logged into it, and the UI seen in a real headless browser."""

import contextlib
import html
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from orchestrator.cli import main as shores_main
from orchestrator.config import load_config
from orchestrator.registry import KIND, KIND_TAG, TRIAL_TAG, Store
from orchestrator.tracking import CULTURES_TAG, NOTE_TAG, ExperimentTracker
from tests import browser
from tests.conftest import (
    OPINIONS,
    REPO,
    TINY_CONFIG,
    free_ports,
    running_ray,
    shores_ui_command,
    tiny_config,
)
from workers.expert_store import CHAMPION, registered_experts


def shores(*args: str) -> tuple[int, str, str]:
    """Run one `shores` command in this process (torch is imported once), with its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = shores_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def reviewed(llama_dir, tmp_path_factory):
    """A tiny experiment (one trial of two cultures, one epoch), then its champions evaluated on test."""
    out = tmp_path_factory.mktemp("review")
    config, sets = tiny_config(
        llama_dir, out, "data.cultures=[Germany, Japan]", "tune.experts_per_trial=2", "train.epochs=1"
    )
    from orchestrator.driver import train

    # A Ray of our own, even where other clusters run on this machine.
    with running_ray():
        assert train(config).experts == ["Germany", "Japan"]
    report = out / "report.json"
    code, stdout, stderr = shores(
        "eval", "--config", TINY_CONFIG, *sets, "--experts", "champion", "--out", report
    )
    assert code == 0, stderr
    return config, sets, json.loads(report.read_text()), stdout


def eval_run(tracker: ExperimentTracker):
    runs = tracker.store.client().search_runs(
        [tracker.store.experiment_id()], "tags.`mlflow.runName` = 'eval-test'"
    )
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_eval_is_logged_into_the_experiment_and_tags_the_champions(reviewed):
    config, _, report, stdout = reviewed
    tracker = ExperimentTracker(config)
    client, run = tracker.store.client(), eval_run(tracker)
    assert f"logged to MLflow: run eval-test ({tracker.run_url(run.info.run_id)})" in stdout
    assert run.info.status == "FINISHED"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"report.json", "report.png", "alignment_table.txt"}
    metrics = run.data.metrics
    for culture, row in report["cultures"].items():
        assert metrics[f"base.{culture}"] == pytest.approx(row["base"])
        low, high = metrics[f"base.{culture}.ci95_low"], metrics[f"base.{culture}.ci95_high"]
        assert low <= row["base"] <= high
    assert metrics["expert.overall"] == pytest.approx(report["overall"]["expert"])
    assert "Germany" in run.data.tags[NOTE_TAG] and "committee" in run.data.tags[NOTE_TAG]

    champions = [r for r in registered_experts(tracker.store) if CHAMPION in r["aliases"]]
    assert {r["culture"] for r in champions} == {"Germany", "Japan"}
    for row in champions:
        tags = client.get_model_version(row["model"], str(row["version"])).tags
        assert tags["test_alignment"] == f"{report['cultures'][row['culture']]['expert']:.4f}"


@pytest.mark.slow
def test_trials_carry_their_cultures_and_the_parent_run_lists_trials_and_winners(reviewed):
    config, *_ = reviewed
    tracker = ExperimentTracker(config)
    client, experiment_id = tracker.store.client(), tracker.store.experiment_id()
    assert client.get_experiment(experiment_id).tags[KIND_TAG] == KIND
    (trial,) = client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` != ''")
    assert trial.data.tags[CULTURES_TAG] == "Germany, Japan"
    parent = client.get_run(trial.data.tags["mlflow.parentRunId"])
    note = parent.data.tags[NOTE_TAG]
    assert (
        f"[trial-{trial.data.tags[TRIAL_TAG]}](#/experiments/{experiment_id}/runs/{trial.info.run_id})"
        in note
    )
    assert "[shores-germany v1](#/models/shores-germany/versions/1)" in note and "| yes |" in note


@pytest.mark.slow
def test_eval_with_mlflow_unreachable_warns_and_still_writes_the_report(reviewed, tmp_path):
    config, sets, *_ = reviewed
    (port,) = free_ports()  # nothing listens there
    down = ["--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}", "--set", "mlflow.retries=1"]
    report = tmp_path / "report.json"
    code, stdout, stderr = shores(
        "eval", "--config", TINY_CONFIG, *sets, *down, "--experts", config.experts_dir, "--out", report
    )
    assert code == 0, stderr
    assert "warning: MLflow at" in stderr and f"the report is only in {report}" in stderr
    assert json.loads(report.read_text())["cultures"]["Germany"]["expert"] is not None
    assert report.with_suffix(".png").exists() and "overall" in stdout


def wait_until_healthy(url: str, ui: subprocess.Popen, limit: float = 120) -> None:
    """Return once the server's readiness endpoint answers; fail if it exits or never does."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert ui.poll() is None, f"the UI exited with {ui.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)  # the next try of a bounded readiness wait, not a timing window
    raise AssertionError(f"{url} not ready after {limit} s")


def page_text(url: str) -> str:
    """The visible text of a page once its scripts ran, tags dropped and spaces collapsed."""
    dom = browser.page_dom(url)
    body = re.sub(r"<(style|script)\b.*?</\1>", " ", dom[dom.find("<body") :], flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


@pytest.mark.slow
@pytest.mark.skipif(browser.CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)")
def test_the_mlflow_ui_shows_the_champions_and_the_evaluation_chart(reviewed, tmp_path):
    config, sets, *_ = reviewed
    (port,) = free_ports()
    ui = subprocess.Popen(
        shores_ui_command(port, *sets),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: the MLflow server and its workers stop together
    )
    try:
        address = f"http://127.0.0.1:{port}/"
        announced = ui.stdout.readline()
        experiment_url = announced.split("the experiment: ", 1)[1].split(" ", 1)[0]
        wait_until_healthy(address + "health", ui)

        models = page_text(address + "#/models")
        for culture in ("germany", "japan"):
            assert re.search(rf"shores-{culture} Version 1 @\s*champion : Version 1", models), models[:2000]

        # The link `shores ui` prints opens the experiment on its runs, not on MLflow's GenAI traces.
        runs = page_text(experiment_url)
        assert "eval-test" in runs and "Traces 0" not in runs

        tracker = ExperimentTracker(config)
        chart_url = address + tracker.run_url(eval_run(tracker).info.run_id, "artifacts/report.png")
        dom = browser.page_dom(chart_url)
        assert re.search(r'<img alt="report\.png" src="blob:', dom)  # the chart itself, fetched and shown
        assert "alignment_table.txt" in dom and "report.json" in dom

        shot = browser.screenshot(
            chart_url, os.environ.get("SHORES_REVIEW_SCREENSHOT") or tmp_path / "ui.png"
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


def test_an_experiment_made_before_is_marked_model_training_when_opened_again(tmp_path):
    store = Store.from_config(load_config(TINY_CONFIG, [f"output_dir={tmp_path}", f"data.path={OPINIONS}"]))
    made = store.client().create_experiment(store.experiment, store.artifact_root)  # as older shores did
    assert KIND_TAG not in store.client().get_experiment(made).tags
    assert store.experiment_id() == made
    assert store.client().get_experiment(made).tags[KIND_TAG] == KIND
