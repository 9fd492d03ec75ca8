"""Replicas that agree, on real Serve on 127.0.0.1 with the tiny model: a reload that fails is retried until
every replica serves the new experts, the router's catalogue never flips back to the older set meanwhile, and
a replica whose MLflow registry is down starts from its last good local copy.

A reload fails at an exact point through the pool's $SHORES_RELOAD_FAULT hook: while the file it names exists,
the first replica to reload after it appeared fails every reload. Every wait is on the status endpoint.
"""

import json

import httpx
import pytest

from serve.expert_set import RELOAD_FAULT_ENV
from tests.conftest import free_ports, mlflow_server
from tests.serving import (
    CULTURES,
    SIMILARITY,
    client,
    local_serve,
    register,
    replicas,
    serve_config,
    wait_for,
    write_experts,
)
from workers.expert_store import SIMILARITY_FILE

pytestmark = pytest.mark.slow  # Serve with several replicas, and an MLflow server

QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}


def catalogue_version(http: httpx.Client) -> str:
    return http.get("/v1/experts").json()["experts_version"]


def test_a_failed_reload_is_retried_until_every_replica_agrees(tiny_model_dirs, tmp_path, monkeypatch):
    model, experts, fault = tiny_model_dirs["llama"], tmp_path / "experts", tmp_path / "reload-fault"
    write_experts(experts, model, CULTURES, similarity=SIMILARITY)
    monkeypatch.setenv(RELOAD_FAULT_ENV, str(fault))  # before Ray starts: the replicas inherit it
    config = serve_config(model, tmp_path, num_replicas=2, cpus_per_replica=0.5, reload_interval_s=0.2)
    with local_serve(config) as url, client(url) as http:
        [old] = {state["experts_version"] for state in replicas(http, 2).values()}
        assert catalogue_version(http) == old
        fault.touch()  # the first replica to reload now fails, until the file goes
        write_experts(experts, model, ["Peru"], seed=9)

        def split(states: dict) -> bool:
            return any(s["reload_failures"] for s in states.values()) and any(
                s["experts_version"] != old for s in states.values()
            )

        states = replicas(http, 2, split)
        [behind] = [s for s in states.values() if s["experts_version"] == old]
        [ahead] = [s for s in states.values() if s["experts_version"] != old]
        new = ahead["experts_version"]
        assert behind["reload_pending"] == new and behind["reload_failures"] >= 1
        assert ahead["reload_pending"] is None and ahead["reload_failures"] == 0

        # Answers come from both sets; the catalogue moves to the newer one and never back.
        def ask() -> str:
            assert http.post("/v1/opinion", json=QUESTION | {"culture": "Germany"}).status_code == 200
            return catalogue_version(http)

        seen = [ask()]
        while seen[-1] != new:  # an answer at the new set makes the router read the catalogue again
            seen.append(ask())
        seen += [ask() for _ in range(16)]
        assert seen[seen.index(new) :] == [new] * (len(seen) - seen.index(new)), seen

        fault.unlink()  # the failing replica's next retry loads the new set
        states = replicas(
            http,
            2,
            lambda states: all(
                s["experts_version"] == new and s["reload_pending"] is None for s in states.values()
            ),
        )
        assert states[behind["replica"]]["reloads"] == 1 and states[behind["replica"]]["reload_failures"] >= 1
        assert states[ahead["replica"]]["reload_failures"] == 0
        answers = [http.post("/v1/opinion", json=QUESTION | {"culture": "Peru"}) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 8  # every replica serves the new expert
        assert {a.json()["experts_version"] for a in answers} == {new}
        assert catalogue_version(http) == new


def test_a_replica_starts_from_its_last_good_copy_while_mlflow_is_down(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llama"]
    files = write_experts(tmp_path / "staging", model, CULTURES)
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / SIMILARITY_FILE).write_text(json.dumps(SIMILARITY))  # where training leaves it
    mlflow_port, metrics_port = free_ports(2)
    config = serve_config(model, tmp_path, experts_source="registry", reload_interval_s=0.5)
    with mlflow_server(mlflow_port, tmp_path) as uri:
        config.mlflow.tracking_uri = uri
        for path in files:
            register(config, path, 0.6)
        with local_serve(config) as url, client(url) as http:
            served = http.get("/v1/experts").json()
            assert [e["version"] for e in served["experts"]] == [
                "shores-germany v1",
                "shores-japan v1",
                "shores-kenya v1",
            ]
            assert not replicas(http, 1).popitem()[1]["last_good"]
    # MLflow is down now: a new replica starts from the copy the last one kept, and says so.
    with local_serve(config, metrics_port=metrics_port) as url, client(url) as http:
        assert http.get("/v1/experts").json() == served
        [state] = replicas(
            http, 1, lambda states: all(s["reload_failures"] for s in states.values())
        ).values()
        assert state["last_good"] and state["experts_version"] == served["experts_version"]
        answer = http.post("/v1/opinion", json=QUESTION | {"culture": "Kenya"})
        assert answer.status_code == 200 and answer.json()["committee"][0]["version"] == "shores-kenya v1"

        def gauge() -> float | None:
            lines = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text.splitlines()
            values = [
                float(line.split()[-1]) for line in lines if line.startswith("ray_shores_experts_last_good")
            ]
            return values[-1] if values else None

        assert wait_for(lambda: gauge() is not None, interval=1) and gauge() == 1  # the export is periodic
