"""Ray Tune + MLflow end to end on a tiny model: registry, champions, GPU pinning, retries, resume, outages, and
the shared prior's stage before the cultures'."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from ray import tune

from orchestrator.cli import main as shores_main
from orchestrator.driver import train
from orchestrator.registry import Store
from orchestrator.tune import run_trial
from tests.conftest import OPINIONS, REPO, TINY_CONFIG, free_ports, mlflow_server, running_ray, tiny_config
from workers.cultures import SHARED
from workers.expert_file import load_expert
from workers.expert_store import SIMILARITY_FILE, load_experts, registered_experts


def champions(store):
    return {r["culture"]: r for r in registered_experts(store) if "champion" in r["aliases"]}


@pytest.mark.slow
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
        shores_main(
            ["eval", "--config", str(TINY_CONFIG), *sets, "--experts", "champion", "--out", str(report)]
        )
        == 0
    )
    assert json.loads(report.read_text())["cultures"]["Germany"]["expert"] is not None
    assert shores_main(["experts", "--config", str(TINY_CONFIG), *sets]) == 0
    assert "shores-germany" in capsys.readouterr().out


@pytest.mark.slow
def test_trials_are_pinned_to_their_own_gpu_and_fall_back_to_cpu(llama_dir, tmp_path):
    with running_ray(num_gpus=2):
        config, _ = tiny_config(llama_dir, tmp_path, "data.cultures=[Germany, Japan]", "train.epochs=4")
        from orchestrator.survey import prepare_data
        from orchestrator.tune import tuner
        from workers.shared_base import SharedBase

        results = tuner(config, prepare_data(config.data), SharedBase.load(str(llama_dir))).fit()
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(TINY_CONFIG), *sets],
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

    resumed = _shores(
        ["train", "--resume", "--config", str(TINY_CONFIG), *sets], stdout=subprocess.PIPE, text=True
    )
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert finished.read_text() == done_lines  # the finished trial was not trained again
    assert "saved 2 experts" in out
    assert sorted(p.stem for p in (tmp_path / "experts").glob("*.safetensors")) == ["germany", "japan"]


@pytest.mark.slow
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


def train_with_prior(llama_dir, tmp_path, *sets):
    """`shores train` of the tiny config with a 16-question prior and one epoch (on the test's `local_ray`)."""
    config, _ = tiny_config(
        llama_dir, tmp_path, "shared.enabled=true", "shared.max_questions=16", "train.epochs=1", *sets
    )
    return config, train(config)


@pytest.mark.slow
def test_tune_trains_registers_and_publishes_the_prior_beside_the_experts(llama_dir, tmp_path, local_ray):
    config, outcome = train_with_prior(llama_dir, tmp_path, "data.cultures=[Germany]")
    assert outcome.experts == ["Germany", SHARED]
    experts = {e.meta.culture: e for e in load_experts(tmp_path / "experts")}
    assert set(experts) == {"Germany", SHARED}
    assert "most people around the world" in experts[SHARED].meta.descriptor
    similarity = json.loads((tmp_path / "experts" / SIMILARITY_FILE).read_text())
    assert all(SHARED not in row for row in similarity.values())  # committees never draw the prior
    registered = {r["culture"] for r in registered_experts(Store.from_config(config))}
    assert registered == {"Germany", SHARED}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["input", "deep"])
def test_init_shared_trains_the_prior_first_and_starts_every_expert_from_it(
    kind, llama_dir, tmp_path, local_ray
):
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


@pytest.mark.slow
def test_experts_on_the_prior_may_train_only_its_top_layers(llama_dir, tmp_path, local_ray):
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


def shores_train(sets: list[str], *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`shores train` in its own process (Ctrl-C reaches only it), with SHORES_FAULT set or unset."""
    env = {k: v for k, v in os.environ.items() if k != "SHORES_FAULT"} | {"PYTHONUNBUFFERED": "1"}
    if fault:
        env["SHORES_FAULT"] = fault
    args = [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(TINY_CONFIG), *extra]
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


@pytest.mark.slow
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
