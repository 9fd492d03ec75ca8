"""`shores serve` in operation: champions from the MLflow registry, new champions picked up without a restart,
a bounded load test, a replica killed under load, and a clean shutdown on Ctrl-C.

The module starts `shores serve --config C` once, as a user would (its own local Ray, two pool replicas),
and talks to it over HTTP on 127.0.0.1 only.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import REPO, free_ports
from tests.serving import SIMILARITY, client, register, replicas, serve_config, wait_for, write_experts
from workers.expert_store import SIMILARITY_FILE

pytestmark = pytest.mark.slow  # a `shores serve` process and an MLflow server

QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-ops")
    model = tiny_model_dirs["llama"]
    files = dict(
        zip(
            ["Germany", "Japan", "Kenya"],
            write_experts(out / "staging", model, ["Germany", "Japan", "Kenya"]),
        )
    )
    config = serve_config(
        model,
        out,
        experts_source="registry",
        reload_interval_s=1,
        num_replicas=2,
        cpus_per_replica=0.5,
        port=free_ports(1)[0],
    )
    (out / "experts").mkdir()
    (out / "experts" / SIMILARITY_FILE).write_text(json.dumps(SIMILARITY))  # where training leaves it
    for culture in ("Germany", "Japan"):
        register(config, files[culture], 0.6)
    path = out / "serve.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log = open(out / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(path)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"},  # its own Ray, never a neighbour's
    )
    url = f"http://127.0.0.1:{config.serve.deployment.port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"shores serve exited: {(out / 'serve.log').read_text()[-3000:]}")
        try:
            return httpx.get(url + "/v1/status", timeout=5).status_code == 200  # the pool is up too
        except httpx.HTTPError:
            return False

    wait_for(up, interval=1)
    with client(url) as http:
        yield {
            "url": url,
            "http": http,
            "config": config,
            "files": files,
            "process": process,
            "log": out / "serve.log",
        }
    if process.poll() is None:  # the last test stops it; this only cleans up after a failure
        process.send_signal(signal.SIGINT)
        process.wait()
    log.close()


def opinion(http, **body) -> dict:
    response = http.post("/v1/opinion", json=QUESTION | body)
    assert response.status_code == 200, response.text
    return response.json()


def test_registry_champions_are_served_with_their_versions(server):
    http = server["http"]
    experts = {e["culture"]: e["version"] for e in http.get("/v1/experts").json()["experts"]}
    assert experts == {"Germany": "shores-germany v1", "Japan": "shores-japan v1"}
    canada = opinion(http, culture="Canada")["committee"]  # Kenya is nearer but not registered yet
    assert [(m["culture"], m["version"]) for m in canada] == [
        ("Germany", "shores-germany v1"),
        ("Japan", "shores-japan v1"),
    ]


def test_new_champions_are_picked_up_without_a_restart(server):
    from serve.app import expert_source

    http, config, files = server["http"], server["config"], server["files"]
    before = opinion(http, culture="Kenya")["committee"]  # no expert yet: its nearest registered experts
    assert "Kenya" not in [m["culture"] for m in before]
    assert register(config, files["Kenya"], 0.6)["champion"]
    assert register(config, files["Germany"], 0.7)["champion"]  # better: the alias moves to v2
    new = expert_source(config).version()
    # The two replicas poll on their own: until each says it serves the new set, and the router knows it.
    replicas(http, 2, lambda states: all(s["experts_version"] == new for s in states.values()))
    wait_for(lambda: http.get("/v1/experts").json()["experts_version"] == new)
    answers = [opinion(http, culture=c)["committee"][0]["version"] for c in ["Kenya", "Germany"] * 4]
    assert set(answers) == {"shores-kenya v1", "shores-germany v2"}
    canada = opinion(http, culture="Canada")["committee"]
    assert [m["culture"] for m in canada] == ["Germany", "Kenya", "Japan"]
    assert server["process"].poll() is None  # the same server all along


def _check(kind: str, response: httpx.Response) -> None:
    """A response is well-formed for its kind (raises AssertionError otherwise)."""
    assert response.status_code == 200, response.text
    body = response.json()
    weights = [m["weight"] for m in body["committee"]]
    assert abs(sum(weights) - 1) < 1e-4 and all(m["version"] for m in body["committee"])
    if kind == "opinion":
        assert len(body["distribution"]) == 3 and abs(sum(body["distribution"]) - 1) < 1e-6
    elif kind == "generate":
        assert isinstance(body["text"], str) and body["finish_reason"] in ("stop", "length")
    else:
        assert body["choices"][0]["message"]["role"] == "assistant"


MIX = [
    ("opinion", "/v1/opinion", QUESTION | {"culture": "Germany"}),
    ("opinion", "/v1/opinion", QUESTION | {"culture": "Japan"}),
    ("opinion", "/v1/opinion", QUESTION | {"culture": "Kenya"}),
    ("opinion", "/v1/opinion", QUESTION | {"culture": "Canada"}),
    ("opinion", "/v1/opinion", QUESTION | {"culture": "base"}),
    ("opinion", "/v1/opinion", QUESTION | {"profile": "I am a teacher in Osaka."}),
    ("generate", "/v1/generate", {"prompt": "Do you trust", "culture": "Brazil", "max_new_tokens": 4}),
    (
        "chat",
        "/v1/chat/completions",
        {"model": "shores:auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    ),
]


def test_bounded_load_across_experts_has_no_errors(server):
    clients, per_client = 16, 12
    latencies, failures = [], []

    def one_client(c: int) -> None:
        with client(server["url"]) as http:
            for i in range(per_client):
                kind, path, body = MIX[(c + i) % len(MIX)]
                start = time.perf_counter()
                try:
                    _check(kind, http.post(path, json=body))
                    latencies.append(time.perf_counter() - start)
                except (AssertionError, httpx.HTTPError) as err:
                    failures.append(f"{path}: {err}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as threads:
        list(threads.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    assert failures == []
    assert len(latencies) == clients * per_client
    print(
        f"{len(latencies)} requests, {clients} clients: {len(latencies) / wall:.1f} req/s, p50 {np.median(latencies):.3f} s"
    )


def test_a_replica_killed_under_load_is_replaced(server):
    http = server["http"]
    pids = {state["pid"] for state in replicas(http, 2).values()}
    victim = min(pids)
    stop, sent, outcomes = (
        threading.Event(),
        itertools.count(),
        [],
    )  # (order sent, status, error, Retry-After)

    def load() -> None:
        with client(server["url"]) as h:
            while not stop.is_set():
                order = next(sent)
                response = h.post("/v1/opinion", json=QUESTION | {"culture": "Japan"})
                error = response.json().get("error") if response.status_code != 200 else None
                outcomes.append((order, response.status_code, error, response.headers.get("retry-after")))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(outcomes) >= 4, interval=0.1)  # the load is on
    os.kill(victim, signal.SIGKILL)
    try:
        # Until the replacement answers (the victim cannot: the states are read after the kill).
        up = replicas(http, 1, lambda states: any(s["pid"] not in pids for s in states.values()))
        replacement = {s["pid"] for s in up.values()} - pids
        replaced = next(sent)  # requests sent from now on were sent after the replacement came up
        wait_for(lambda: sum(order > replaced for order, *_ in outcomes) >= 8, interval=0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert replacement and victim not in replacement
    after = [status for order, status, _, _ in outcomes if order > replaced]
    assert after and all(s == 200 for s in after), "requests fail after the replacement came up"
    failed = [(status, error, retry) for _, status, error, retry in outcomes if status != 200]
    print(f"{len(failed)} of {len(outcomes)} failed while the replica was replaced")
    # What the dead replica was running is answered, not replayed on another: a 503 JSON the client may retry.
    assert all(status == 503 and "stopped" in error and retry for status, error, retry in failed), failed


def test_ctrl_c_shuts_the_server_down_cleanly(server):
    process = server["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    log = server["log"].read_text()
    assert f"serving on {server['url']}" in log and "Traceback" not in log
    with pytest.raises(httpx.HTTPError):
        httpx.get(server["url"] + "/healthz", timeout=2)
