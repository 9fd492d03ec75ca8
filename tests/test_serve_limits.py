"""The server under bad input and overload, over real HTTP on 127.0.0.1: one poison request fails alone, a
flood gets 503 with Retry-After, a stalled pool gets a 504, a client that leaves a stream frees its rows, a
request over the cache budget is refused beside good ones, a replica whose engine breaks is replaced,
metrics reach Ray's Prometheus endpoint, and `shores serve` refuses an open host without a key and stops
cleanly on SIGTERM.

Serve starts once for the module, with tiny limits (a pool replica takes 4 requests, 1 more may queue) and
a pool whose requests wait at a gate actor that the tests open (`tests.serving.gated_pool`: requests let
through together join the engine's batch together), and whose engine waits before each decode step at a
second gate while that one exists.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import psutil
import pytest
import ray
import yaml

from tests.conftest import REPO, free_ports
from tests.serving import (
    BREAKING_PROMPT,
    CULTURES,
    POOL_GATE,
    SIMILARITY,
    STEP_GATE,
    breakable_pool,
    client,
    closed_gate,
    gated_pool,
    local_serve,
    pool_settings,
    serve_config,
    wait_for,
    write_experts,
)
from workers.base_model import load_frozen_base

pytestmark = pytest.mark.slow  # a local Serve and `serve run` processes

GATE = "test-gate"
QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}
# Serve counts a request as queued until a replica takes it: a queue of 4 lets 4 simultaneous arrivals in.
# The module's deadline is never met: requests wait at a gate as long as a test holds them, however slow the
# machine. The stalled-pool test has a second application whose router gives the pool DEADLINE_S.
ONGOING, QUEUED, TIMEOUT_S, DEADLINE_S = 4, 4, 3600, 5
CACHE_TOKENS = 800  # a committee of two fits with prompts of up to ~390 tokens; one row with any prompt


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-limits")
    write_experts(out / "experts", tiny_model_dirs["llama"], CULTURES, similarity=SIMILARITY)
    config = serve_config(
        tiny_model_dirs["llama"],
        out,
        reload_interval_s=0,  # no background calls to a pool the tests keep full
        max_batch_size=ONGOING,
        max_ongoing_requests=ONGOING,
        max_queued_requests=QUEUED,
        request_timeout_s=TIMEOUT_S,
        max_committee_size=2,
        committee_size=2,
        max_new_tokens=16,
        default_max_new_tokens=4,
        max_cache_tokens=CACHE_TOKENS,
    )
    (metrics_port,) = free_ports(1)
    with local_serve(config, metrics_port=metrics_port, pool=gated_pool()) as url:
        with client(url) as http:
            yield {
                "url": url,
                "http": http,
                "metrics": metrics_port,
                "model": tiny_model_dirs["llama"],
                "config": config,
            }


@pytest.fixture(scope="module")
def short_deadline(server):
    """The URL of a second application of the same graph (under /deadline) whose router waits DEADLINE_S."""
    from ray import serve

    from serve.app import build_app

    config = server["config"].model_copy(deep=True)
    config.serve.deployment.request_timeout_s = DEADLINE_S
    config.serve.deployment.cpus_per_replica = 0.5
    serve.run(build_app(config, gated_pool()), name="shores-deadline", route_prefix="/deadline")
    yield server["url"] + "/deadline"
    serve.delete("shores-deadline")


def until(ref):
    """The value of a gate call, once it comes (a test that hangs is ended by its own timeout)."""
    return ray.get(ref)


def post_all(url: str, bodies: list[tuple[str, dict]]) -> list:
    """Futures of the responses to `bodies`, posted concurrently."""
    threads = ThreadPoolExecutor(len(bodies))

    def post(path_body):
        with client(url) as http:
            return http.post(path_body[0], json=path_body[1])

    return [threads.submit(post, b) for b in bodies]


def good_generations(http) -> tuple[list[tuple[str, dict]], list[str]]:
    """A short generation for each culture, and the text each answers when sent alone."""
    good = [
        ("/v1/generate", {"prompt": "tell me about trust", "culture": c, "max_new_tokens": 4})
        for c in CULTURES
    ]
    return good, [http.post(path, json=body).json()["text"] for path, body in good]


def test_a_poison_request_fails_alone_in_a_batch_of_good_ones(server):
    http = server["http"]
    good, alone = good_generations(http)
    too_long = ("/v1/generate", {"prompt": "yes " * 600, "culture": "Japan", "max_new_tokens": 4})
    with closed_gate(POOL_GATE) as gate:
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
    # The three joined the engine's batch together, beside the poison, and decoded side by side.
    assert any(b["kind"] == "decode" and b["requests"] == len(good) for b in recent), recent


def test_requests_for_different_experts_share_one_forward_pass(server):
    http = server["http"]
    requests = [QUESTION | {"culture": c} for c in ["Germany", "Japan", "base", "Canada"]]
    alone = [http.post("/v1/opinion", json=r).json()["distribution"] for r in requests]
    with closed_gate(POOL_GATE) as gate:
        futures = post_all(server["url"], [("/v1/opinion", r) for r in requests])
        until(gate.until_waiting.remote(len(futures)))
        until(gate.open.remote())
        together = [f.result() for f in futures]
    for response, distribution in zip(together, alone):
        assert response.status_code == 200, response.text
        assert response.json()["distribution"] == pytest.approx(distribution, abs=1e-5)
    recent = http.get("/v1/status").json()["pool"]["recent"]
    batch = [b for b in recent if b["kind"] == "opinion"][-1]  # one forward pass for the four
    assert batch["requests"] == 4 and batch["rows"] == 5, recent  # Canada: a committee of two
    assert set(batch["experts"]) == {"Germany", "Japan", "Kenya", "base"}


def _sse_events(response: http.client.HTTPResponse, count: int) -> list[dict]:
    """The next `count` JSON events of a server-sent event stream."""
    events = []
    while len(events) < count:
        line = response.readline().decode()
        assert line, "the stream ended"
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
    return events


def test_a_client_that_leaves_a_stream_frees_its_rows(server):
    http_client, host, port = server["http"], *server["url"].removeprefix("http://").split(":")

    def pool() -> dict:
        return http_client.get("/v1/status").json()["pool"]

    before = pool()
    with closed_gate(STEP_GATE) as steps:  # the engine stops before each decode step while it is shut
        connection = http.client.HTTPConnection(host, int(port))
        body = {"prompt": "tell me about trust", "culture": "Canada", "max_new_tokens": 16, "stream": True}
        connection.request("POST", "/v1/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        [first] = _sse_events(response, 1)  # the first token (from the prefill), while the engine waits
        assert set(first) == {"token", "text"}
        until(steps.until_waiting.remote(1))  # the engine holds before the second token
        held = pool()
        assert held["running_requests"] == 1 and held["running_rows"] == 2  # a committee of two
        response.close()
        connection.close()  # the client goes away mid-stream
        wait_for(lambda: pool()["closed_early"] == before["closed_early"] + 1)
        until(steps.open.remote())  # the engine steps again: the cancelled rows leave at this step
        after = wait_for(lambda: (p := pool())["running_rows"] == 0 and p)
    assert after["finished"]["cancelled"] == before["finished"]["cancelled"] + 1
    assert after["finished"]["length"] == before["finished"]["length"]  # it did not run on to its end
    answer = http_client.post("/v1/generate", json={"prompt": "hello", "culture": "Japan"})
    assert answer.status_code == 200  # the server keeps serving


def test_bad_bodies_and_limits_are_json_errors(server):
    http = server["http"]
    deep = http.post("/v1/opinion", content=b"[" * 60000, headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    big = http.post("/v1/opinion", json=QUESTION | {"culture": "Canada", "committee_size": 3})
    assert big.status_code == 422 and "over the cap of 2" in big.json()["error"]


def test_a_flood_gets_503_with_retry_after(server):
    url, opinion = server["url"], ("/v1/opinion", QUESTION | {"culture": "Japan"})
    answered = server["http"].get("/v1/status").json()["router"]["answered"].get("/v1/opinion", {})
    with closed_gate(POOL_GATE) as gate:
        held = post_all(url, [opinion] * ONGOING)  # no deadline runs out while they wait (TIMEOUT_S)
        until(gate.until_waiting.remote(ONGOING))  # the replica is full
        flood = post_all(url, [opinion] * (QUEUED + 2))  # QUEUED may queue; the other 2 cannot
        refused, pending = [], set(flood)
        while len(refused) < 2:  # nothing else can answer while the gate is shut
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            refused += [f.result() for f in done]
        until(gate.open.remote())
        rest = [f.result() for f in [*held, *pending]]
    assert len(refused) == 2
    for response in refused:
        assert response.status_code == 503, response.text
        assert "overloaded" in response.json()["error"] and response.headers["retry-after"] == "1"
    assert [r.status_code for r in rest] == [200] * (ONGOING + QUEUED), [r.text for r in rest]
    after = server["http"].get("/v1/status").json()["router"]["answered"]["/v1/opinion"]
    assert after.get("503", 0) - answered.get("503", 0) == 2  # counted as they were answered


def test_a_request_over_the_cache_budget_is_refused_while_its_neighbours_finish(server):
    http = server["http"]
    good, alone = good_generations(http)
    # Inside the context window (512), but a committee of two rows of ~450 slots is over the budget.
    tokenizer = load_frozen_base(str(server["model"]), device="cpu").tokenizer
    prompt = tokenizer.decode(tokenizer("yes " * 1000, add_special_tokens=False)["input_ids"][:450])
    assert 420 < len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) < 480
    over = ("/v1/generate", {"prompt": prompt, "culture": "Canada", "max_new_tokens": 4})
    before = http.get("/v1/status").json()["router"]["answered"].get("/v1/generate", {})
    with closed_gate(POOL_GATE) as gate:
        futures = post_all(server["url"], [*good, over])
        until(gate.until_waiting.remote(len(futures)))
        until(gate.open.remote())
        responses = [f.result() for f in futures]
    for response, text in zip(responses[:-1], alone):
        assert response.status_code == 200, response.text
        assert response.json()["text"] == text
    refused = responses[-1]
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]
    assert (
        f"over the cache budget of {CACHE_TOKENS}" in message and "serve.limits.max_cache_tokens" in message
    )
    status = http.get("/v1/status").json()
    assert status["router"]["answered"]["/v1/generate"]["422"] == before.get("422", 0) + 1  # counted
    cache = status["pool"]["cache"]
    assert cache["budget"] == CACHE_TOKENS and 0 < cache["peak"] <= CACHE_TOKENS
    assert 0 < cache["slot_steps_needed"] <= cache["slot_steps_used"]


def test_a_replica_whose_engine_breaks_fails_its_health_check_and_is_replaced(server, tmp_path):
    """A second application on the module's Serve: one pool replica whose engine thread dies on a prompt."""
    from ray import serve

    from serve.protocol import GenerateJob
    from workers.committees import Committee

    write_experts(tmp_path, server["model"], ["Japan"])
    pool = serve.run(
        breakable_pool(
            pool_settings(server["model"], tmp_path),
            health_check_period_s=1,
            ray_actor_options={"num_cpus": 0},
        ),
        name="breakable",
        route_prefix=None,
    )
    try:

        def generate(prompt: str):
            return pool.generate.remote(GenerateJob(Committee([("Japan", 1.0)]), 4, prompt=prompt))

        first = pool.health.remote().result(timeout_s=120).replica
        with pytest.raises(Exception, match="engine thread died"):  # an error, never a hang
            generate(BREAKING_PROMPT).result(timeout_s=120)

        def replaced() -> str | None:  # Serve's health check failed the replica and started another
            try:
                replica = pool.health.remote().result(timeout_s=30).replica
            except Exception:  # noqa: BLE001 - the broken one is being stopped
                return None
            return replica if replica != first else None

        wait_for(replaced, interval=1)
        answer = generate("hello").result(timeout_s=120)
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        serve.delete("breakable")


def test_a_stalled_pool_gets_504_and_the_request_is_cancelled(server, short_deadline):
    with closed_gate(POOL_GATE) as gate:
        future = post_all(short_deadline, [("/v1/opinion", QUESTION | {"culture": "Kenya"})])[0]
        until(gate.until_waiting.remote(1))
        response = future.result()  # the gate never opens: the router's deadline answers
        assert response.status_code == 504
        assert f"did not answer within {float(DEADLINE_S)} s" in response.json()["error"]
        assert until(gate.until_fewer.remote(1)) == 0  # the router cancelled the pool's work
    assert server["http"].post("/v1/opinion", json=QUESTION).status_code == 200


def test_metrics_reach_prometheus(server):
    http = server["http"]
    for culture in CULTURES:
        assert http.post("/v1/generate", json={"prompt": "hello", "culture": culture}).status_code == 200
    assert http.post("/v1/opinion", json=QUESTION | {"culture": "Kenya"}).status_code == 200
    # Each series, as a line of the scrape starting with the first string and holding the others.
    wanted = {
        "requests": ["ray_shores_requests", 'endpoint="/v1/generate"', 'expert="shores:japan"'],
        "latency": ["ray_shores_request_latency_s_count", 'endpoint="/v1/generate"'],
        "tokens": ["ray_shores_generated_tokens", 'expert="Kenya"'],
        "first token": ["ray_shores_time_to_first_token_s_count", 'expert="Kenya"'],
        "decode rows": ["ray_shores_batch_rows_count", 'kind="decode"'],
        "opinion rows": ["ray_shores_batch_rows_count", 'kind="opinion"'],
        "decode experts": ["ray_shores_batch_experts_count", 'kind="decode"'],
    }

    def missing() -> list[str]:
        lines = httpx.get(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).text.splitlines()
        return [
            name
            for name, (prefix, *parts) in wanted.items()
            if not any(
                line.startswith(prefix) and all(p in line for p in parts) and float(line.split()[-1]) > 0
                for line in lines
            )
        ]

    wait_for(lambda: not missing(), interval=1)  # the export is periodic: until a scrape shows every series


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
    assert process.wait() != 0
    output = log.read_text()
    assert (
        "serve.deployment.host 0.0.0.0 is reachable from other machines" in output
        and "Traceback" not in output
    )


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

    wait_for(up, interval=1)
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
