"""The experiment tracker on a real sqlite MLflow store, safe publishing of experts, and credentials kept out."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.publish import ANSWERS_FILE, publish_experts
from orchestrator.registry import Store, TrackingError, public_config, restore_credentials
from orchestrator.results import FinishedTrial, Winner
from orchestrator.survey import prepare_data
from orchestrator.tracking import ExperimentTracker
from tests.conftest import OPINIONS, TINY_CONFIG, free_ports, mlflow_server, running_ray
from workers.cultures import slug
from workers.expert_file import Expert, ExpertMeta, load_expert, save_expert
from workers.expert_store import CHAMPION, SIMILARITY_FILE, load_experts, redact, registered_experts

SECRET = "s3cr3t-pw"


def config_in(out: Path, *overrides: str):
    sets = [f"output_dir={out}", f"data.path={OPINIONS}", "data.cultures=[Germany, Japan]", *overrides]
    return load_config(TINY_CONFIG, sets)


def expert_folder(
    folder: Path, culture: str, fingerprint: str = "f" * 16, tokens: int = 4, training: dict | None = None
) -> Path:
    """A folder holding one expert file and its adapter, as a trial's checkpoint does."""
    meta = ExpertMeta(culture, culture[:2].upper(), tokens, 8, "tiny", fingerprint, training or {})
    save_expert(folder / f"{slug(culture)}.safetensors", Expert(torch.zeros(tokens, 8), meta))
    (folder / "peft" / slug(culture)).mkdir(parents=True, exist_ok=True)
    (folder / "peft" / slug(culture) / "adapter_config.json").write_text("{}")
    return folder


def trial_with(tmp_path: Path, trial_id: str, scores: dict, **meta) -> tuple[FinishedTrial, dict]:
    """A finished trial holding one expert a culture, and those experts as winners."""
    folder = tmp_path / trial_id
    for culture in scores:
        expert_folder(folder, culture, training={"trial": trial_id}, **meta)
    history = [{"epoch": 1, "val_gain": 0.1} | {f"val_alignment/{c}": s for c, s in scores.items()}]
    winners = {c: Winner(c, trial_id, folder, s) for c, s in scores.items()}
    return FinishedTrial(trial_id, folder, {"lr": 0.1}, history), winners


@pytest.fixture
def tracker(tmp_path):
    return ExperimentTracker(config_in(tmp_path))


def champion_of(store: Store, culture: str) -> int | None:
    rows = [r for r in registered_experts(store) if r["culture"] == culture and CHAMPION in r["aliases"]]
    return rows[0]["version"] if rows else None


def test_registering_again_adds_no_versions_even_after_a_partly_logged_first_try(tmp_path, tracker):
    trial, winners = trial_with(tmp_path, "t1", {"Germany": 0.6, "Japan": 0.5})

    def store_goes_down(point, model):
        if model == "shores-japan":  # Germany is registered and promoted, Japan's version exists, no alias
            raise TrackingError("MLflow went away")

    with pytest.raises(TrackingError):
        ExperimentTracker(tracker.config, hook=store_goes_down).record([trial], winners)
    assert champion_of(tracker.store, "Japan") is None
    first = tracker.record([trial], winners)
    again = ExperimentTracker(tracker.config).record([trial], winners)
    assert [(r.culture, r.version, r.champion) for r in first] == [("Germany", 1, True), ("Japan", 1, True)]
    assert [(r.version, r.champion) for r in again] == [(1, True), (1, True)]
    rows = registered_experts(tracker.store)
    assert len(rows) == 2 and all(CHAMPION in r["aliases"] for r in rows)
    client = tracker.store.client()
    run = client.get_run(tracker.runs["t1"])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_gain")] == [1]  # not repeated
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "experts/germany")}
    assert artifacts == {"experts/germany/germany.safetensors", "experts/germany/peft"}


@pytest.mark.parametrize(
    "challenger, promoted",
    [
        ({"val_alignment": 0.7}, True),
        ({"val_alignment": 0.5}, False),
        ({"val_alignment": 0.9, "fingerprint": "0" * 16}, False),  # another base model
        ({"val_alignment": 0.9, "tokens": 8}, False),  # another prompt shape
    ],
)
def test_champion_moves_only_to_a_better_expert_of_the_same_base_and_shape(
    tmp_path, tracker, challenger, promoted
):
    trial, winners = trial_with(tmp_path, "t1", {"Germany": 0.6})
    tracker.record([trial], winners)
    score = challenger.pop("val_alignment")
    trial2, winners2 = trial_with(tmp_path, "t2", {"Germany": score}, **challenger)
    (row,) = tracker.record([trial2], winners2)
    assert row.version == 2 and row.champion == promoted
    assert champion_of(tracker.store, "Germany") == (2 if promoted else 1)
    if challenger:
        assert "another base or prompt shape" in row.note


@pytest.mark.parametrize(
    "when, theirs, winner",
    [
        ("champion-read", 0.9, "theirs"),  # promoted between our read and our write: better, it stays
        ("champion-read", 0.65, "ours"),  # ... worse: compared again, ours wins
        ("champion-set", 0.65, "ours"),  # moved right after our write: compared again, ours wins
        ("champion-set", 0.9, "theirs"),
    ],
)
def test_champion_promotion_is_compare_and_set(tmp_path, tracker, when, theirs, winner):
    trial, winners = trial_with(tmp_path, "t1", {"Germany": 0.6})
    tracker.record([trial], winners)
    rival_trial, rival_winners = trial_with(tmp_path, "rival", {"Germany": theirs})
    rival = ExperimentTracker(config_in(tmp_path, "name=rival"))
    rival.trial_finished(rival_trial)
    competed = []

    def rival_promotes(point, model):
        if point == when and not competed:
            version = rival.register(rival_winners["Germany"]).version
            # The rival's own compare-and-set may have lost to ours already: force its write here.
            tracker.store.client().set_registered_model_alias(model, CHAMPION, str(version))
            competed.append(version)

    trial2, winners2 = trial_with(tmp_path, "t2", {"Germany": 0.7})
    contender = ExperimentTracker(tracker.config, hook=rival_promotes)
    (row,) = contender.record([trial2], winners2)
    (rival_version,) = competed
    expected = rival_version if winner == "theirs" else row.version
    assert champion_of(tracker.store, "Germany") == expected
    assert row.champion == (winner == "ours")


def test_publishing_swaps_in_whole_sets_and_keeps_the_old_one_when_nothing_finished(tmp_path, capsys):
    config = config_in(tmp_path)
    data = prepare_data(config.data)
    experts = config.experts_dir
    experts.mkdir(parents=True)  # a plain folder, as an older shores left it
    save_expert(
        experts / "old.safetensors", Expert(torch.zeros(4, 8), ExpertMeta("Old", "OL", 4, 8, "t", "f" * 16))
    )

    _, first = trial_with(tmp_path, "t1", {"Germany": 0.6, "Japan": 0.5})
    assert publish_experts(experts, first, data, replace=True) == experts
    assert experts.is_symlink()
    assert [e.meta.culture for e in load_experts(experts)] == ["Germany", "Japan"]
    reading = experts.resolve()  # a server in the middle of loading the first set
    # Another run writing its own set beside ours: not complete yet, so never ours to remove.
    theirs = tmp_path / ".experts-theirs"
    expert_folder(theirs, "Kenya")

    _, second = trial_with(tmp_path, "t2", {"Germany": 0.7})
    broken = dict(second) | {"Japan": Winner("Japan", "gone", tmp_path / "gone", 0.9)}
    with pytest.raises(FileNotFoundError):  # a crash half-way through writing the new set ...
        publish_experts(experts, broken, data)
    assert [e.meta.culture for e in load_experts(experts)] == ["Germany", "Japan"]  # ... is never seen

    publish_experts(experts, second, data, replace=True)
    assert [e.meta.culture for e in load_experts(experts)] == ["Germany"]
    assert (experts / "similarity.json").exists() and (experts / "peft" / "germany").is_dir()
    assert [e.meta.culture for e in load_experts(reading)] == ["Germany", "Japan"]  # still there for it

    assert publish_experts(experts, {}, data) is None  # every trial failed before its first checkpoint
    assert "keeping the experts already in" in capsys.readouterr().err
    assert [e.meta.culture for e in load_experts(experts)] == ["Germany"]
    publish_experts(experts, first, data)
    versions = sorted(p.name for p in tmp_path.glob(".experts-*") if p != theirs)
    assert len(versions) == 2  # the current set and the one before it; older complete ones are removed
    assert not reading.exists()
    assert theirs.is_dir()  # the other run's set in progress is left alone


def test_publishing_adds_and_replaces_cultures_and_refuses_another_base_or_shape(tmp_path, capsys):
    config = config_in(tmp_path, "data.cultures=[Germany, Japan, Kenya]")
    data = prepare_data(config.data)
    experts = config.experts_dir
    _, first = trial_with(tmp_path, "t1", {"Germany": 0.6, "Japan": 0.5})
    publish_experts(experts, first, data)
    (experts / ANSWERS_FILE).unlink()  # a set published before sets kept their answers still merges

    _, kenya = trial_with(tmp_path, "t2", {"Kenya": 0.7})
    _, japan = trial_with(tmp_path, "t3", {"Japan": 0.8})
    _, other_base = trial_with(tmp_path, "t4", {"Germany": 0.9}, fingerprint="0" * 16)
    _, other_shape = trial_with(tmp_path, "t5", {"Germany": 0.9}, tokens=8)
    publish_experts(experts, kenya | japan, data)
    publish_experts(experts, other_base, data)
    publish_experts(experts, other_shape, data)
    err = capsys.readouterr().err
    assert "not publishing Germany: its base tiny (fingerprint 0000000000000000)" in err
    assert "not publishing Germany: its prompt shape differs" in err and "num_virtual_tokens 8" in err
    assert [e.meta.culture for e in load_experts(experts)] == ["Germany", "Japan", "Kenya"]
    trials = {
        c: load_expert(experts / f"{slug(c)}.safetensors").meta.training["trial"]
        for c in ("Germany", "Japan")
    }
    assert trials == {"Germany": "t1", "Japan": "t3"}  # the first Germany kept, Japan replaced
    similarity = json.loads((experts / SIMILARITY_FILE).read_text())
    assert {"Germany", "Japan", "Kenya"} <= set(similarity["Canada"])  # held-out Canada: every expert
    assert set(similarity["Germany"]) == {"Japan", "Kenya"}
    assert set(json.loads((experts / ANSWERS_FILE).read_text())) == {"Germany", "Japan", "Kenya"}

    publish_experts(experts, other_base, data, replace=True)  # --replace: this run's experts alone
    assert [e.meta.culture for e in load_experts(experts)] == ["Germany"]


@pytest.mark.parametrize(
    "uri, shown",
    [
        (f"http://user:{SECRET}@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
        (f"https://{SECRET}@mlflow.example", "https://***@mlflow.example"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ],
)
def test_credentials_are_redacted_from_uris(uri, shown):
    assert redact(f"failed: {uri}/api/2.0 and {uri}") == f"failed: {shown}/api/2.0 and {shown}"


def test_tracking_errors_and_saved_configs_hold_no_credentials(tmp_path, monkeypatch):
    (port,) = free_ports(1)  # nothing listens there
    uri = f"http://user:{SECRET}@127.0.0.1:{port}"
    config = config_in(tmp_path, f"mlflow.tracking_uri={uri}", "mlflow.retries=1")
    with pytest.raises(TrackingError) as caught:
        ExperimentTracker(config).store.experiment_id()
    assert SECRET not in str(caught.value) and "user:***@127.0.0.1" in str(caught.value)
    assert SECRET not in repr(Store.from_config(config))

    saved = public_config(config)
    assert saved.mlflow.tracking_uri == f"http://user:***@127.0.0.1:{port}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="pass the original config with --config"):
        restore_credentials(saved)
    assert restore_credentials(saved, config).mlflow.tracking_uri == uri
    other = config_in(tmp_path, f"mlflow.tracking_uri=http://user:{SECRET}@elsewhere:1")
    with pytest.raises(ConfigError):
        restore_credentials(saved, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert restore_credentials(saved).mlflow.tracking_uri == uri


@pytest.mark.slow
def test_a_store_with_credentials_down_during_training_gets_everything_later_once(llama_dir, tmp_path, capfd):
    """End to end: no secret in files or Ray's logs; `register --from` needs it back, and twice adds nothing."""
    import ray

    from orchestrator.cli import main as shores_main
    from orchestrator.driver import train

    (port,) = free_ports(1)
    uri = f"http://user:{SECRET}@127.0.0.1:{port}"
    config = config_in(tmp_path, f"base_model.name={llama_dir}", f"mlflow.tracking_uri={uri}")
    with running_ray(log_to_driver=True):  # the workers' output reaches the driver: the test reads it there
        outcome = train(config)  # no server is listening yet
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert outcome.experts == ["Germany", "Japan"] and outcome.registered == []
    printed = capfd.readouterr()
    assert "user:***@127.0.0.1" in printed.err and SECRET not in printed.out + printed.err
    leaked = subprocess.run(
        ["grep", "-rla", SECRET, str(tmp_path), str(session / "logs")], capture_output=True
    )
    assert leaked.stdout == b"", leaked.stdout.decode()

    with mlflow_server(port, tmp_path):
        assert shores_main(["register", "--from", str(tmp_path)]) == 2  # the saved config has no secret
        assert "pass the original config with --config" in capfd.readouterr().err
        original = tmp_path.parent / f"{tmp_path.name}-original.yaml"
        original.write_text(yaml.safe_dump(config.model_dump(mode="json")))  # what the user started with
        for _ in range(2):
            assert shores_main(["register", "--from", str(tmp_path), "--config", str(original)]) == 0
        store = Store.from_config(config)
        rows = registered_experts(store)
        assert sorted((r["culture"], r["version"], r["aliases"]) for r in rows) == [
            ("Germany", 1, [CHAMPION]),
            ("Japan", 1, [CHAMPION]),
        ]
        client = store.client()
        (parent,) = client.search_runs([store.experiment_id()], "tags.`shores.experiment` = 'tiny'")
        assert (
            "user:***@127.0.0.1" in parent.data.params["config"]
            and SECRET not in parent.data.params["config"]
        )
