"""Ray Tune + MLflow end to end on a tiny model: registry, champions, GPU pinning, retries, resume, outages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray import tune

from orchestrator.cli import main as shores_main
from orchestrator.config import load_config
from orchestrator.tracking import Store
from orchestrator.train import train
from orchestrator.tune import run_trial
from tests.conftest import OPINIONS, REPO, free_ports, mlflow_server
from workers.expert_file import load_expert
from workers.expert_store import registered_experts

TINY = REPO / "tests" / "tiny.yaml"


def tiny_config(model_dir, out, *overrides):
    sets = [f"base_model.name={model_dir}", f"output_dir={out}", f"data.path={OPINIONS}", *overrides]
    return load_config(TINY, sets), [x for s in sets for x in ("--set", s)]


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
    assert outcome.experts == ["Germany", "Japan", "Kenya"]
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
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config, _ = tiny_config(llama_dir, tmp_path, "data.cultures=[Germany, Japan]", "train.epochs=4")
        from orchestrator.survey import prepare_data
        from orchestrator.tune import tuner
        from workers.shared_base import SharedBase

        results = tuner(config, prepare_data(config.data), SharedBase.load(str(llama_dir))).fit()
    finally:
        ray.shutdown()
    rows = [r.metrics for r in results]
    assert sorted(r["gpu_id"] for r in rows) == [0.0, 1.0]
    assert all(r["cuda_visible_devices"] == str(int(r["gpu_id"])) for r in rows)
    assert all(r["device"] == "cpu" for r in rows)  # no CUDA here: the model ran on the CPU


def test_the_config_loads_without_torch():
    # The CLI validates a config before anything heavy starts: reading one must not import the model stack.
    code = "import sys, orchestrator.config; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_fault_fires_once_and_a_bad_one_is_one_clear_line(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.faults import Fault

    fault = Fault.parse("kill-after-checkpoint:1:3", tmp_path)
    assert (fault.group, fault.epoch) == (1, 3)
    assert fault.fire_once() and not fault.fire_once()  # the retried trial finds the marker
    assert not Fault.parse("kill-after-checkpoint:1:3", tmp_path).fire_once()
    with pytest.raises(ConfigError, match=r"^SHORES_FAULT='kill-after-checkpoint:0': expected") as caught:
        Fault.parse("kill-after-checkpoint:0", tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", ["out-of-memory:1:2", " "])
def test_a_set_fault_variable_is_always_a_warning_naming_it(tmp_path, monkeypatch, capsys, value):
    from orchestrator.faults import Fault

    monkeypatch.delenv("SHORES_FAULT", raising=False)
    assert Fault.from_env(tmp_path) is None and capsys.readouterr().err == ""
    monkeypatch.setenv("SHORES_FAULT", value)
    fault = Fault.from_env(tmp_path)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: SHORES_FAULT is set") and "unset SHORES_FAULT" in line
    assert (fault is None) == (value.strip() == "")
    if fault is not None:
        assert value in line and fault.kind == "out-of-memory"


def trial_folder(experiment: Path, group: int) -> Path:
    """The Tune folder of the trial that trained culture group `group`."""
    return next(
        p.parent for p in experiment.glob("*/params.json") if json.loads(p.read_text())["group"] == group
    )


def test_a_killed_trial_is_retried_from_its_checkpoint(llama_dir, tmp_path, local_ray, monkeypatch):
    # The first culture group's trial SIGKILLs itself once Tune has its epoch-1 checkpoint.
    monkeypatch.setenv("SHORES_FAULT", "kill-after-checkpoint:0:1")
    config, _ = tiny_config(llama_dir, tmp_path, "data.cultures=[Germany, Japan]")  # 2 epochs
    outcome = train(config)
    assert (tmp_path / "faults" / "kill-after-checkpoint-0-1").exists()  # it fired, and only once
    assert outcome.experts == ["Germany", "Japan"]
    assert len(outcome.registered) == 2
    # What the driver recorded with each checkpoint (result.json can miss a line across a retry).
    results = tune.Tuner.restore(str(tmp_path / "tune" / "tiny"), run_trial).get_results()
    killed = next(r for r in results if r.config["group"] == 0)
    history = sorted((m["epoch"], m["pid"]) for _, m in killed.best_checkpoints)
    assert [epoch for epoch, _ in history] == [1, 2]  # continued from the checkpoint, not from epoch 1 ...
    assert history[0][1] != history[1][1]  # ... in a new process


def test_a_trial_out_of_memory_is_one_line_of_advice_and_resume_finishes_it(
    llama_dir, tmp_path, local_ray, monkeypatch, capsys
):
    # The second culture group's trial runs out of memory in epoch 2, on every attempt.
    monkeypatch.setenv("SHORES_FAULT", "out-of-memory:1:2")
    config, _ = tiny_config(
        llama_dir, tmp_path, "data.cultures=[Germany, Japan]", "tune.max_failures=1", "tune.scheduler=fifo"
    )  # fifo: ASHA could stop the trial after epoch 1, before its fault
    outcome = train(config)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial ")]
    assert len(lines) == 1 and len(outcome.failed) == 1
    assert "(Japan) failed: MemoryError" in lines[0] and "(out of memory)" in lines[0]
    assert "train.batch_size" in lines[0] and "--resume" in lines[0]
    # Nothing is lost: Germany's expert, and Japan's from its epoch-1 checkpoint, are published. (Read from
    # the published expert, not Tune's result.json: a restarted trial's result.json is restored from a storage
    # copy synced on a timer, so its rows depend on timing.)
    assert outcome.experts == ["Germany", "Japan"]
    japan = config.experts_dir / "japan.safetensors"
    assert load_expert(japan).meta.training["epochs_run"] == 1

    monkeypatch.delenv("SHORES_FAULT")  # with more memory, say
    resumed = train(config, resume=True)
    assert resumed.failed == [] and resumed.experts == ["Germany", "Japan"]
    assert load_expert(japan).meta.training["epochs_run"] == 2


def test_what_ended_a_trial_is_one_line_and_memory_is_told_apart():
    from orchestrator.results import failure_reason, out_of_memory

    killed = ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory.\nMemory on..."
    )
    torch_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
    assert (
        failure_reason(killed) == "OutOfMemoryError: Task was killed due to the node running low on memory."
    )
    assert out_of_memory(killed) and out_of_memory(torch_oom) and out_of_memory(MemoryError())
    assert not out_of_memory(ValueError("lr must be positive"))
    assert failure_reason(ValueError("")) == "ValueError"


def _shores(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, **kwargs)


def test_resume_continues_without_retraining_finished_trials(llama_dir, tmp_path):
    _, sets = tiny_config(
        llama_dir,
        tmp_path,
        "data.cultures=[Germany, Japan]",
        "tune.max_concurrent_trials=1",
        "tune.scheduler=fifo",
    )
    # Ctrl-C as soon as the first culture group's trial has finished: Tune saves its state and stops.
    env = dict(os.environ, PYTHONUNBUFFERED="1", SHORES_FAULT="interrupt-after-trial:0")
    first = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(TINY), *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert first.returncode == 130, (first.stdout + first.stderr)[-3000:]
    assert "interrupted" in first.stdout
    finished = trial_folder(tmp_path / "tune" / "tiny", 0) / "result.json"
    done_lines = finished.read_text()
    assert len(done_lines.splitlines()) == 2  # all its epochs

    resumed = _shores(["train", "--resume", "--config", str(TINY), *sets], stdout=subprocess.PIPE, text=True)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert finished.read_text() == done_lines  # the finished trial was not trained again
    assert "saved 2 experts" in out
    assert sorted(p.stem for p in (tmp_path / "experts").glob("*.safetensors")) == ["germany", "japan"]


def test_mlflow_outage_loses_nothing_and_register_from_logs_it_later(llama_dir, tmp_path, local_ray):
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    config, _ = tiny_config(
        llama_dir, tmp_path, f"mlflow.tracking_uri={uri}", "data.cultures=[Germany, Japan]"
    )
    outcome = train(config)  # no server is listening yet
    assert outcome.experts == ["Germany", "Japan"] and outcome.registered == []
    assert len(list((tmp_path / "experts").glob("*.safetensors"))) == 2

    with mlflow_server(port, tmp_path):
        assert shores_main(["register", "--from", str(tmp_path)]) == 0
        rows = registered_experts(Store.from_config(config))
        assert {r["culture"] for r in rows if "champion" in r["aliases"]} == {"Germany", "Japan"}
        downloaded = tmp_path / "downloaded"
        from workers.expert_store import download_champions

        download_champions(Store.from_config(config), downloaded)
        assert (
            len([p for p in downloaded.rglob("*.safetensors") if p.name != "adapter_model.safetensors"]) == 2
        )
