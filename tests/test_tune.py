"""Ray Tune + MLflow end to end on a tiny model: registry, champions, GPU pinning, retries, resume, outages."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from orchestrator.cli import main as shores_main
from orchestrator.config import load_config
from orchestrator.tracking import Store
from orchestrator.train import train
from tests.conftest import OPINIONS, REPO, free_ports
from workers.expert_store import registered_experts

TINY = REPO / "configs" / "tiny.yaml"


def tiny_config(model_dir, out, *overrides):
    sets = [f"base_model.name={model_dir}", f"output_dir={out}", f"data.path={OPINIONS}", *overrides]
    return load_config(TINY, sets), [x for s in sets for x in ("--set", s)]


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def champions(store):
    return {r["culture"]: r for r in registered_experts(store) if "champion" in r["aliases"]}


def test_train_registers_every_culture_and_moves_champion_only_when_better(
    llama_dir, tmp_path, local_ray, capsys
):
    # Two learning rates for one group of three: ASHA schedules them, each culture keeps its better trial.
    config, sets = tiny_config(
        llama_dir,
        tmp_path,
        "tune.experts_per_trial=3",
        "train.epochs=3",
        "tune.search_space={lr: [0.05, 0.2]}",
    )
    outcome = train(config)
    assert outcome["experts"] == ["Germany", "Japan", "Kenya"]
    assert sorted(p.name for p in (tmp_path / "experts").glob("*.safetensors")) == [
        "germany.safetensors",
        "japan.safetensors",
        "kenya.safetensors",
    ]
    store = Store.from_config(config)
    first = champions(store)
    assert set(first) == {"Germany", "Japan", "Kenya"} and all(r["version"] == 1 for r in first.values())
    assert all(len(r["base_fingerprint"]) == 16 for r in first.values())

    # A second experiment that cannot learn (a vanishing learning rate) registers new versions,
    # but `champion` stays wherever the old version validates better.
    weak, _ = tiny_config(llama_dir, tmp_path, "tune.experts_per_trial=3", "train.lr=1e-9", "train.epochs=1")
    train(weak.model_copy(update={"name": "tiny-weak"}))
    second = champions(store)
    versions = {r["culture"]: r for r in registered_experts(store) if r["version"] == 2}
    for culture in first:
        better = versions[culture]["val_alignment"] > first[culture]["val_alignment"]
        assert second[culture]["version"] == (2 if better else 1)
    assert any(second[c]["version"] == 1 for c in first)  # the trained experts beat the untrained ones

    # Evaluation takes the champions from the registry.
    report = tmp_path / "report.json"
    assert (
        shores_main(["eval", "--config", str(TINY), *sets, "--experts", "champion", "--out", str(report)])
        == 0
    )
    assert json.loads(report.read_text())["cultures"]["Germany"]["expert"] is not None
    assert shores_main(["experts", "--config", str(TINY), *sets]) == 0
    assert "shores-germany" in capsys.readouterr().out


def test_trials_are_pinned_to_their_own_gpu_and_fall_back_to_cpu(llama_dir, tmp_path):
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config, _ = tiny_config(llama_dir, tmp_path, "data.cultures=[Germany, Japan]", "train.epochs=4")
        from orchestrator.experiment import prepare_data
        from orchestrator.tune import tuner
        from workers.shared_base import SharedBase

        results = tuner(config, prepare_data(config.data), SharedBase.load(str(llama_dir))).fit()
    finally:
        ray.shutdown()
    rows = [r.metrics for r in results]
    assert sorted(r["gpu_id"] for r in rows) == [0.0, 1.0]
    assert all(r["cuda_visible_devices"] == str(int(r["gpu_id"])) for r in rows)
    assert all(r["device"] == "cpu" for r in rows)  # no CUDA here: the model ran on the CPU
    spans = [(r["started"], r["timestamp"]) for r in rows]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # the two trials ran at the same time


def test_a_killed_trial_is_retried_from_its_checkpoint(llama_dir, tmp_path, local_ray):
    config, _ = tiny_config(
        llama_dir, tmp_path, "data.cultures=[Germany, Japan]", "train.epochs=30", "train.patience=40"
    )
    killed = {}

    def kill_first_trial_after_its_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for result_file in (tmp_path / "tune" / "tiny").glob("*/result.json"):
                lines = result_file.read_text().splitlines()
                # Mid-training only: a trial that has already finished would not need a retry.
                if 0 < len(lines) < 20 and list(result_file.parent.glob("checkpoint_*")):
                    pid = json.loads(lines[0])["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"], killed["trial"] = pid, result_file.parent
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_trial_after_its_first_checkpoint)
    killer.start()
    outcome = train(config)
    killer.join()
    assert killed, "no trial was killed"
    assert outcome["experts"] == ["Germany", "Japan"]
    assert len(outcome["registered"]) == 2
    lines = [json.loads(x) for x in (killed["trial"] / "result.json").read_text().splitlines()]
    pids = {x["pid"] for x in lines}
    assert killed["pid"] in pids and len(pids) == 2  # a new process took over ...
    epochs = [x["epoch"] for x in lines]
    assert epochs[-1] == 30 and epochs.count(1) == 1  # ... from the checkpoint, not from epoch 1


def _shores(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, **kwargs)


def test_resume_continues_without_retraining_finished_trials(llama_dir, tmp_path):
    _, sets = tiny_config(
        llama_dir,
        tmp_path,
        "tune.max_concurrent_trials=1",
        "train.epochs=8",
        "train.patience=20",
        "tune.scheduler=fifo",
    )
    log = open(tmp_path / "first.log", "w")
    first = _shores(["train", "--config", str(TINY), *sets], stdout=log, stderr=subprocess.STDOUT)
    experiment = tmp_path / "tune" / "tiny"
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and not finished and first.poll() is None:
        for result_file in experiment.glob("*/result.json"):
            if len(result_file.read_text().splitlines()) == 8:  # all its epochs reported
                finished.append(result_file)
        time.sleep(0.2)
    assert finished, (tmp_path / "first.log").read_text()[-2000:]
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    assert first.wait(120) != 0
    done_lines = finished[0].read_text()

    resumed = _shores(["train", "--resume", "--config", str(TINY), *sets], stdout=subprocess.PIPE, text=True)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert finished[0].read_text() == done_lines  # the finished trial was not trained again
    assert "saved 3 experts" in out
    assert sorted(p.stem for p in (tmp_path / "experts").glob("*.safetensors")) == [
        "germany",
        "japan",
        "kenya",
    ]


def test_mlflow_outage_loses_nothing_and_register_from_logs_it_later(llama_dir, tmp_path, local_ray):
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    config, _ = tiny_config(
        llama_dir, tmp_path, f"mlflow.tracking_uri={uri}", "data.cultures=[Germany, Japan]"
    )
    outcome = train(config)  # no server is listening yet
    assert outcome["experts"] == ["Germany", "Japan"] and outcome["registered"] == []
    assert len(list((tmp_path / "experts").glob("*.safetensors"))) == 2

    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import httpx

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert shores_main(["register", "--from", str(tmp_path)]) == 0
        rows = registered_experts(Store.from_config(config))
        assert {r["culture"] for r in rows if "champion" in r["aliases"]} == {"Germany", "Japan"}
        downloaded = tmp_path / "downloaded"
        from workers.expert_store import download_champions

        download_champions(Store.from_config(config), downloaded)
        assert (
            len([p for p in downloaded.rglob("*.safetensors") if p.name != "adapter_model.safetensors"]) == 2
        )
    finally:
        server.terminate()
        server.wait(30)
