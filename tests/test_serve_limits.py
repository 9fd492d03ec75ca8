"""The server under bad input and overload, over real HTTP on 127.0.0.1: one poison request fails alone, a
flood gets 503 with Retry-After, a stalled pool gets a 504, metrics reach Ray's Prometheus endpoint, and
`shores serve` refuses an open host without a key and stops cleanly on SIGTERM.

Serve starts once for the module, with tiny limits (a pool replica takes 4 requests, 1 more may queue) and
a pool whose requests wait at a gate actor that the tests open (the pool's $SHORES_POOL_GATE hook).
"""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import psutil
import pytest
import ray
import yaml

from serve.pool import GATE_ENV
from tests.conftest import REPO, free_ports
from tests.serving import (
    CULTURES,
    SIMILARITY,
    client,
    closed_gate,
    local_serve,
    serve_config,
    wait_for,
    write_experts,
)

GATE = "test-gate"
QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}
# Serve counts a request as queued until a replica takes it: a queue of 4 lets 4 simultaneous arrivals in.
# The deadline is far above what a tiny model needs even on a busy machine: only the stalled pool meets it.
ONGOING, QUEUED, TIMEOUT_S = 4, 4, 30


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-limits")
    write_experts(out / "experts", tiny_model_dirs["llama"], CULTURES, similarity=SIMILARITY)
    config = serve_config(
        tiny_model_dirs["llama"],
        out,
        reload_interval_s=0,  # no background calls to a pool the tests keep full
        max_batch_size=ONGOING,
        batch_wait_timeout_s=0.25,  # requests let through the gate together form one batch
        max_ongoing_requests=ONGOING,
        max_queued_requests=QUEUED,
        request_timeout_s=TIMEOUT_S,
        max_committee_size=2,
        committee_size=2,
        max_new_tokens=16,
        default_max_new_tokens=4,
    )
    (metrics_port,) = free_ports(1)
    os.environ[GATE_ENV] = GATE  # before ray.init: the replicas inherit it
    try:
        with local_serve(config, metrics_port=metrics_port) as url:
            with client(url) as http:
                yield {"url": url, "http": http, "metrics": metrics_port, "model": tiny_model_dirs["llama"]}
    finally:
        del os.environ[GATE_ENV]


def until(ref):
    """The value of a gate call; bounded, so that a test fails instead of hanging."""
    return ray.get(ref, timeout=120)


def post_all(url: str, bodies: list[tuple[str, dict]]) -> list:
    """Futures of the responses to `bodies`, posted concurrently."""
    threads = ThreadPoolExecutor(len(bodies))

    def post(path_body):
        with client(url) as http:
            return http.post(path_body[0], json=path_body[1])

    return [threads.submit(post, b) for b in bodies]


def test_a_poison_request_fails_alone_in_a_batch_of_good_ones(server):
    http = server["http"]
    good = [
        ("/v1/generate", {"prompt": "tell me about trust", "culture": c, "max_new_tokens": 4})
        for c in CULTURES
    ]
    alone = [http.post(path, json=body).json()["text"] for path, body in good]
    too_long = ("/v1/generate", {"prompt": "yes " * 600, "culture": "Japan", "max_new_tokens": 4})
    with closed_gate(GATE) as gate:
        futures = post_all(server["url"], [*good, too_long])
        until(gate.until_waiting.remote(len(futures)))  # all four in the pool, about to batch together
        until(gate.open.remote())
        responses = [f.result() for f in futures]
    for response, text in zip(responses[:-1], alone):
        assert response.status_code == 200, response.text
        assert response.json()["text"] == text  # the same answer as alone
    poison = responses[-1]
    assert poison.status_code == 422
    assert "over the limit of" in poison.json()["error"] and "context window of 512" in poison.json()["error"]
    recent = http.get("/v1/status").json()["pool"]["recent"]
    assert any(b["requests"] == len(good) for b in recent), recent  # the three shared a batch with the poison


def test_bad_bodies_and_limits_are_json_errors(server):
    http = server["http"]
    deep = http.post("/v1/opinion", content=b"[" * 60000, headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    big = http.post("/v1/opinion", json=QUESTION | {"culture": "Canada", "committee_size": 3})
    assert big.status_code == 422 and "over the cap of 2" in big.json()["error"]


def test_a_flood_gets_503_with_retry_after(server):
    url, opinion = server["url"], ("/v1/opinion", QUESTION | {"culture": "Japan"})
    with closed_gate(GATE) as gate:
        held = post_all(url, [opinion] * ONGOING)
        until(gate.until_waiting.remote(ONGOING))  # the replica is full
        flood = post_all(url, [opinion] * (QUEUED + 2))  # QUEUED may queue; the rest cannot
        refused, pending, done = [], set(flood), True
        while len(refused) < 2 and done:  # nothing else can answer while the gate is shut
            done, pending = wait(pending, timeout=120, return_when=FIRST_COMPLETED)
            refused += [f.result() for f in done]
        until(gate.open.remote())
        rest = [f.result() for f in [*held, *pending]]
    for response in refused:
        assert response.status_code == 503, response.text
        assert "overloaded" in response.json()["error"] and response.headers["retry-after"] == "1"
    assert all(r.status_code == 200 for r in rest), [r.text for r in rest]


def test_a_stalled_pool_gets_504_and_the_request_is_cancelled(server):
    with closed_gate(GATE) as gate:
        future = post_all(server["url"], [("/v1/opinion", QUESTION | {"culture": "Kenya"})])[0]
        until(gate.until_waiting.remote(1))
        response = future.result()  # the gate never opens: the router's deadline answers
        assert response.status_code == 504
        assert f"did not answer within {float(TIMEOUT_S)} s" in response.json()["error"]
        assert until(gate.until_fewer.remote(1)) == 0  # the router cancelled the pool's work
    assert server["http"].post("/v1/opinion", json=QUESTION).status_code == 200


def test_metrics_reach_prometheus(server):
    http = server["http"]
    for culture in CULTURES:
        assert http.post("/v1/generate", json={"prompt": "hello", "culture": culture}).status_code == 200
    wanted = ["shores_requests", "shores_request_latency_s", "shores_generated_tokens", "shores_batch_rows"]

    def scrape() -> str:
        return httpx.get(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).text

    deadline = time.monotonic() + 60  # the export is periodic: wait on the scrape showing it, bounded
    text = scrape()
    while not all(w in text for w in wanted) and time.monotonic() < deadline:
        time.sleep(1)
        text = scrape()
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
    lines = [line for line in text.splitlines() if line.startswith("ray_shores_requests")]
    assert any('endpoint="/v1/generate"' in line and 'expert="shores:japan"' in line for line in lines)
    tokens = [line for line in text.splitlines() if "shores_generated_tokens" in line and "Kenya" in line]
    assert tokens and float(tokens[0].split()[-1]) > 0


def _shores_serve(tmp_path, model, **serve) -> tuple[subprocess.Popen, object]:
    """`shores serve` on a config for the tiny model, as a user starts it; its output goes to serve.log."""
    config = serve_config(model, tmp_path, **serve)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(path)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ
            | {"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"},  # its own Ray, never a neighbour's
        )
    return process, log


def test_an_open_host_without_a_key_is_refused(server, tmp_path):
    write_experts(tmp_path / "experts", server["model"], CULTURES[:1])
    process, log = _shores_serve(tmp_path, server["model"], host="0.0.0.0")
    assert process.wait(120) != 0
    output = log.read_text()
    assert "serve.host 0.0.0.0 is reachable from other machines" in output and "Traceback" not in output


def test_sigterm_shuts_the_server_down_cleanly(server, tmp_path):
    write_experts(tmp_path / "experts", server["model"], CULTURES[:1])
    (port,) = free_ports(1)
    process, log = _shores_serve(tmp_path, server["model"], port=port, reload_interval_s=0)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:  # started, as `shores serve` says once the whole graph is up
        assert process.poll() is None, log.read_text()[-3000:]
        if f"serving on {url}" not in log.read_text():
            return False
        try:
            return httpx.get(url + "/v1/status", timeout=5).status_code == 200  # the pool is up too
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=180, interval=1)
    family = psutil.Process(process.pid).children(recursive=True)
    agents = [p for p in family if any("agent" in part for part in p.cmdline())]
    assert agents, [p.cmdline()[:3] for p in family]  # DashboardAgent and RuntimeEnvAgent, Ray's own
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert alive == [], [p.cmdline()[:3] for p in alive]
    output = log.read_text()
    assert f"serving on {url}" in output and "Ray dashboard: http://127.0.0.1:" in output
    assert "shutting down" in output and "Traceback" not in output
