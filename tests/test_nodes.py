"""Two Ray nodes on this machine: trials on both, one copy of the base a node, checkpoints in storage named
by a URI, and a trial whose node is removed mid-run finished on the other node from its checkpoint."""

import json
import threading
import time

import pyarrow.fs
import pytest
import ray
import ray._common.utils
import ray._private.utils
from ray import tune
from ray.cluster_utils import Cluster

from orchestrator.driver import train
from orchestrator.results import local_checkpoint
from orchestrator.tune import experiment_path, run_trial, storage_path
from tests.conftest import tiny_config


@pytest.fixture
def two_nodes(monkeypatch):
    """A head and a worker node, one CPU each: two one-CPU trials cannot share a node."""
    # Cluster records its address in /tmp/ray/ray_current_cluster, where any plain `ray.init()` on this
    # machine (other people's tests, shores' own connect()) would find it and join: it must not.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()  # stops this cluster's own processes only


def wait_for_file(path, timeout_s: float) -> bool:
    """A bounded wait for a file another process creates."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_trials_run_on_both_nodes_and_a_lost_node_s_trial_resumes_on_the_head(
    llama_dir, tmp_path, two_nodes, monkeypatch
):
    cluster, worker = two_nodes
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head
    storage = f"file://{tmp_path / 'shared-storage'}"
    # The trial on the worker node, once Tune has its epoch-1 checkpoint, writes its report to the marker
    # and waits for its node to be removed.
    monkeypatch.setenv("SHORES_FAULT", "await-node-loss:1")
    config, _ = tiny_config(
        llama_dir,
        tmp_path / "out",
        "data.cultures=[Germany, Japan]",  # two groups, two epochs
        "tune.scheduler=fifo",
        f"tune.storage={storage}",
    )
    marker = tmp_path / "out" / "faults" / "await-node-loss-1"
    seen: dict = {}

    def remove_worker_once_checkpointed() -> None:
        if not wait_for_file(marker, 300):
            return
        try:
            seen["report"] = report = json.loads(marker.read_text())
            base = ray.ObjectRef(bytes.fromhex(report["shared_base"]))
            seen["base_nodes"] = ray.experimental.get_object_locations([base])[base]["node_ids"]
        finally:
            cluster.remove_node(worker)  # the trial waits for this

    remover = threading.Thread(target=remove_worker_once_checkpointed)
    remover.start()
    outcome = train(config)
    remover.join()
    assert "report" in seen, "the trial on the worker node never signalled its checkpoint"

    # The trial on the worker had mapped the one shared base: Ray holds one copy on each node.
    assert seen["report"]["node_id"] == worker.node_id
    assert sorted(seen["base_nodes"]) == sorted([head, worker.node_id])
    # Every culture's expert published and registered, read back from checkpoints in the file:// storage.
    assert outcome.experts == ["Germany", "Japan"] and len(outcome.registered) == 2
    assert sorted(p.stem for p in (tmp_path / "out" / "experts").glob("*.safetensors")) == [
        "germany",
        "japan",
    ]
    assert experiment_path(config) == f"{storage}/tiny"
    assert not (tmp_path / "out" / "tune").exists()

    # What the driver recorded with each checkpoint, read back from the storage URI.
    results = tune.Tuner.restore(experiment_path(config), run_trial).get_results()
    assert all(r.checkpoint.path.startswith(str(tmp_path / "shared-storage")) for r in results)
    reports = {r.config["group"]: [m for _, m in r.best_checkpoints] for r in results}
    assert {m["shared_base"] for ms in reports.values() for m in ms} == {seen["report"]["shared_base"]}
    moved = next(ms for ms in reports.values() if ms[0]["node_id"] == worker.node_id)
    # Epoch 1 on the worker; epoch 2 continued from that checkpoint on the head, not from epoch 1.
    assert [(m["epoch"], m["node_id"]) for m in moved] == [(1, worker.node_id), (2, head)]
    assert {m["node_id"] for ms in reports.values() for m in ms} == {head, worker.node_id}


def test_storage_defaults_to_the_output_dir_and_takes_a_uri(llama_dir, tmp_path):
    config, _ = tiny_config(llama_dir, tmp_path)
    assert storage_path(config) == str(tmp_path.resolve() / "tune")
    config, _ = tiny_config(llama_dir, tmp_path, "tune.storage=s3://bucket/shores/")
    assert experiment_path(config) == "s3://bucket/shores/tiny"


def test_a_checkpoint_outside_the_local_filesystem_is_downloaded(tmp_path):
    # A filesystem other than the local one (as s3:// or gs:// would be): its paths are not folders here.
    (tmp_path / "remote" / "trial" / "checkpoint_000001" / "experts").mkdir(parents=True)
    (tmp_path / "remote" / "trial" / "checkpoint_000001" / "experts" / "x.safetensors").write_bytes(b"x")
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "remote"), pyarrow.fs.LocalFileSystem())
    checkpoint = tune.Checkpoint("trial/checkpoint_000001", filesystem=remote)
    folder = local_checkpoint(checkpoint, tmp_path / "downloads", "t1")
    assert folder == tmp_path / "downloads" / "t1" / "checkpoint_000001"
    assert (folder / "experts" / "x.safetensors").read_bytes() == b"x"
    local = tune.Checkpoint.from_directory(str(tmp_path / "remote" / "trial" / "checkpoint_000001"))
    assert (
        local_checkpoint(local, tmp_path / "downloads", "t2")
        == tmp_path / "remote" / "trial" / "checkpoint_000001"
    )
