"""The cluster: cluster.yaml passes Ray's own launcher validation, and `shores train` submitted with
`ray job submit` to a real head node (loopback only, token auth on) trains and registers every expert."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import OPINIONS, REPO, TINY_CONFIG, free_ports

CLUSTER_YAML = REPO / "cluster.yaml"
VENV_BIN = Path(sys.executable).parent  # the venv running the tests: its `ray` and its `shores`
TORCH_PIN = "torch==2.13.0"
# Never uploaded with a job (the working-dir upload has a size limit, and the venv is the node's own).
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


# ---------------------------------------------------------------------------------------------------------
# cluster.yaml


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_own_validation(cluster):
    """The launcher's own checks, the ones `ray up` runs before it touches AWS: defaults merged in,
    then ray-schema.json and the node-type rules. No credentials, no network."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_rays_validation_catches_a_broken_config(cluster):
    """The check above can fail: an unknown key, or a head type that is not a node type."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(copy.deepcopy(cluster) | {"max_worker": 4}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(copy.deepcopy(cluster) | {"head_node_type": "nope"}))


def test_cluster_has_a_head_and_an_autoscaling_gpu_group(cluster):
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_groups, "no node type offers a GPU"
    for group in gpu_groups.values():
        assert group["min_workers"] == 0  # no GPU is paid for until a trial asks for one
        assert 1 <= group["max_workers"] <= cluster["max_workers"]
        assert group["node_config"]["InstanceType"]


def test_cluster_installs_shores_like_the_makefile(cluster):
    """torch pinned before the project and on every later pip line (as the Makefile does), the project and
    the token mounted, and token auth on every node."""
    commands = cluster["setup_commands"] + cluster["head_setup_commands"] + cluster["worker_setup_commands"]
    pip_lines = [c for c in commands if "pip install" in c and "--upgrade pip" not in c]
    assert "torch==2.13.0" in pip_lines[0] and "-e" not in pip_lines[0]  # torch alone, first
    for line in pip_lines:
        assert TORCH_PIN in line or "--no-deps" in line, line
    assert any("-e $HOME/shores" in c for c in pip_lines)
    mounts = cluster["file_mounts"]
    assert mounts["/home/ubuntu/shores"] == "."
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and "shores-venv/bin:$PATH" in c for c in start)
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])


# ---------------------------------------------------------------------------------------------------------
# `ray job submit` end to end, on a head node of our own


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`ray start` exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token is an answer)
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"no dashboard at {url} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop exactly the processes this test started, by their ids.

    Not `ray stop`: it kills every Ray process on the machine by name, other people's clusters and tests
    included. `ray start --block` stops its own node (GCS, raylet, dashboard, the workers and the job it
    ran) on SIGTERM; anything of that tree still alive afterwards gets SIGKILL.
    """
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_head():
    """A one-node Ray cluster on 127.0.0.1 with the dashboard's job API, its own temp dir and token.

    Token authentication stays on (Ray 2.60's default for `ray start --head`): the test makes a token of
    its own (RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token is neither read nor written) and the cluster and the
    `ray` clients get it with RAY_AUTH_MODE=token. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray keep its
    node address on 127.0.0.1 (by default it replaces 127.0.0.1 with the machine's routable address, and
    the GCS and raylets listen on every interface). Every port is chosen here, none left at a default
    (6379, 8265, 10001, 52365) that another Ray on this machine may hold.
    """
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: unix socket paths are limited
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dashboard, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS from outside
    env |= {
        # The job's entrypoint runs with the cluster's environment: `shores` must be this venv's.
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = temp / "ray-start.log"
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        f"--temp-dir={temp / 'ray'}",
        "--disable-usage-stats",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_http(f"{url}/api/version", proc, log, timeout=90)
        yield url, env
    finally:
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_ray_job_submit_trains_and_registers_every_expert(ray_head, llama_dir, tmp_path):
    url, env = ray_head
    # Token auth is on: the job API refuses a client without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    out = tmp_path / "run"
    overrides = [f"base_model.name={llama_dir}", f"output_dir={out}", f"data.path={OPINIONS}"]
    submit = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        "shores",
        "train",
        "--config",
        str(TINY_CONFIG.relative_to(REPO)),  # inside the uploaded working dir
        *[arg for o in overrides for arg in ("--set", o)],
    ]
    started = time.monotonic()
    job = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    took = time.monotonic() - started
    logs = (job.stdout + job.stderr)[-6000:]
    assert job.returncode == 0, logs
    assert "succeeded" in job.stdout, logs
    # The driver joined this cluster (RAY_ADDRESS inside the job), not a Ray of its own.
    assert "Connecting to existing Ray cluster at address: 127.0.0.1:" in job.stdout + job.stderr, logs
    print(f"ray job submit of shores train (tiny, 3 cultures): {took:.1f} s")

    from orchestrator.config import load_config
    from orchestrator.registry import Store
    from workers.expert_store import registered_experts

    config = load_config(TINY_CONFIG, overrides)
    rows = registered_experts(Store.from_config(config))
    assert sorted(r["culture"] for r in rows) == sorted(config.data.cultures)
    assert all("champion" in r["aliases"] for r in rows)
    experts = out / "experts"
    names = sorted(p.stem for p in experts.glob("*.safetensors"))
    assert len(names) == len(config.data.cultures)
    for name in names:
        assert (experts / "peft" / name / "adapter_config.json").is_file()
        assert (experts / "peft" / name / "adapter_model.safetensors").is_file()
    assert (out / "tune" / config.name).is_dir()  # Tune's storage_path: <output_dir>/tune
