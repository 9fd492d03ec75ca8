"""Who can drive the server, and what they get when it goes wrong, over real HTTP on 127.0.0.1.

JSON bodies must be declared as such (415); the Host header must name this server (421, 400); CORS answers the
configured origins only; `serve run` of a config whose proxy listens on every interface is refused without a
key, as `shores serve` is; a flood of unknown cultures makes no pool call and leaves good requests answered;
every error is JSON and counted by status; a generation cut by the replica's shutdown ends with an error.

Serve starts once for the module (a local Ray, a tiny random Llama, three experts with random prompts and
`Atlantis`, whose prompt is NaN: a broken expert that makes every answer it takes part in non-finite).
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.conftest import REPO, free_ports
from tests.serving import (
    CULTURES,
    SIMILARITY,
    client,
    local_serve,
    pool_settings,
    serve_config,
    wait_for,
    write_experts,
)
from workers.expert_file import load_expert, save_expert

pytestmark = pytest.mark.slow  # a local Serve and `serve run` processes

QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}
JAPAN = QUESTION | {"culture": "Japan"}  # a good request (routing by text could pick the broken expert)
APP = "http://app.example"  # the one origin allowed cross-origin calls


def write_broken_expert(directory: Path, model: Path) -> None:
    """Atlantis: an expert file like any other, whose prompt is NaN."""
    [path] = write_experts(directory, model, ["Atlantis"], seed=3)
    expert = load_expert(path)
    expert.prompt = torch.full_like(expert.prompt, float("nan"))
    save_expert(path, expert)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-exposure")
    model = tiny_model_dirs["llama"]
    write_experts(out / "experts", model, CULTURES, similarity=SIMILARITY)
    write_broken_expert(out / "experts", model)
    config = serve_config(
        model,
        out,
        reload_interval_s=0,
        max_new_tokens=16,
        default_max_new_tokens=6,
        cors_origins=[APP],
        docs=True,
    )
    with local_serve(config) as url:
        with client(url) as http:
            yield {"url": url, "http": http, "model": model}


def status(http: httpx.Client) -> dict:
    return http.get("/v1/status").json()


def test_a_body_not_declared_as_json_is_a_415_and_reaches_no_pool(server):
    http = server["http"]
    before = status(http)["pool"]["calls"]
    body = json.dumps(QUESTION | {"culture": "Japan"})
    for headers in (
        {"content-type": "text/plain"},
        {},
        {"content-type": "application/x-www-form-urlencoded"},
    ):
        response = http.post("/v1/opinion", content=body, headers=headers)
        assert response.status_code == 415 and "application/json" in response.json()["error"], headers
    utf8 = http.post("/v1/opinion", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert utf8.status_code == 200
    after = status(http)["pool"]["calls"]
    assert after.get("opinion", 0) == before.get("opinion", 0) + 1  # only the JSON one reached the pool


def test_the_host_header_must_name_this_server(server):
    url, http = server["url"], server["http"]
    port = int(url.rsplit(":", 1)[1])
    rebound = http.post("/v1/opinion", json=QUESTION, headers={"host": f"attacker.example:{port}"})
    assert rebound.status_code == 421 and "'attacker.example' is not served here" in rebound.json()["error"]
    assert http.get("/v1/models", headers={"host": "attacker.example"}).status_code == 421
    assert (
        http.get("/healthz", headers={"host": "attacker.example"}).status_code == 200
    )  # liveness stays open
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert http.post("/v1/opinion", json=JAPAN, headers={"host": name}).status_code == 200, name

    connection = HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("GET", "/v1/experts", skip_host=True)  # no Host header at all
    connection.endheaders()
    missing = connection.getresponse()
    assert missing.status == 400 and "Host header" in json.loads(missing.read())["error"]
    connection.close()


def test_cors_answers_the_configured_origin_only(server):
    http = server["http"]
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    allowed = http.options("/v1/chat/completions", headers=ask | {"origin": APP})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == APP
    refused = http.options("/v1/chat/completions", headers=ask | {"origin": "http://page.example"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    answered = http.post("/v1/opinion", json=JAPAN, headers={"origin": APP})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == APP
    other = http.post("/v1/opinion", json=JAPAN, headers={"origin": "http://page.example"})
    assert "access-control-allow-origin" not in other.headers  # the browser keeps the answer from the page


def test_the_docs_pages_are_served_when_the_config_asks(server):
    http = server["http"]
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/opinion", "/v1/generate", "/v1/chat/completions", "/v1/completions"} <= set(paths)


def test_a_flood_of_unknown_cultures_costs_no_pool_call_and_good_requests_are_answered(server):
    http = server["http"]
    flood = [f"Narnia {i}" for i in range(170)] + ["Republic", "Korea", "North", "Islands", "United"] * 8
    flood += ["z" * 100 for _ in range(10)]
    requests = [QUESTION | {"culture": name} for name in flood]
    good = JAPAN
    requests[::20] = [good] * len(requests[::20])  # good requests inside the flood
    before = status(http)

    with ThreadPoolExecutor(16) as threads:
        responses = list(threads.map(lambda body: http.post("/v1/opinion", json=body), requests))

    unknown = [r for r, body in zip(responses, requests) if body is not good]
    answered = [r for r, body in zip(responses, requests) if body is good]
    assert len(unknown) >= 200 and all(r.status_code == 404 for r in unknown), {
        r.status_code for r in unknown
    }
    assert all("unknown culture" in r.json()["error"] for r in unknown)
    assert all(r.status_code == 200 for r in answered)
    after = status(http)
    calls = before["pool"]["calls"], after["pool"]["calls"]
    assert calls[1]["catalogue"] == calls[0]["catalogue"]  # answered from the router's catalogue
    assert calls[1]["opinion"] == calls[0]["opinion"] + len(answered)  # the flood reached no pool at all
    counted = before["router"]["answered"]["/v1/opinion"], after["router"]["answered"]["/v1/opinion"]
    assert counted[1]["404"] == counted[0].get("404", 0) + len(unknown)
    too_long = http.post("/v1/opinion", json=QUESTION | {"culture": "z" * 101})
    assert too_long.status_code == 422 and "culture" in too_long.json()["error"]


def test_every_error_is_json_and_counted_by_status(server):
    http = server["http"]
    port = server["url"].rsplit(":", 1)[1]
    surrogate = b'{"question": "q?", "options": ["a", "b"], "profile": "caf\\ud800"}'
    chat = {"model": "shores:atlantis", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("post", "/v1/opinion", {"content": surrogate, "headers": {"content-type": "application/json"}}, 400),
        ("post", "/v1/opinion", {"json": QUESTION | {"culture": "Atlantis"}}, 500),  # a NaN distribution
        ("post", "/v1/generate", {"json": {"prompt": "hi", "culture": "Atlantis"}}, 500),
        ("post", "/v1/chat/completions", {"json": chat}, 500),
        ("post", "/v1/opinion", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
        ("post", "/v1/opinion", {"json": QUESTION, "headers": {"host": f"elsewhere:{port}"}}, 421),
        ("post", "/v1/opinion", {"json": QUESTION | {"culture": "z" * 101}}, 422),
        ("get", "/v1/opinion", {}, 405),
        ("get", "/v1/nowhere", {}, 404),
    ]
    before = status(http)["router"]["answered"]
    for method, path, options, code in cases:
        response = getattr(http, method)(path, **options)
        assert response.status_code == code, (path, response.text)
        error = response.json()["error"]
        assert (error["message"] if isinstance(error, dict) else error).strip(), path
    assert "FloatingPointError" in http.post("/v1/opinion", json=QUESTION | {"culture": "Atlantis"}).text

    body = {"prompt": "hi", "culture": "Atlantis", "stream": True}
    with http.stream("POST", "/v1/generate", json=body) as streamed:  # the error comes after the status
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert streamed.status_code == 200 and "internal error" in events[-1]["error"]

    after = status(http)["router"]["answered"]
    expected = Counter((path if code != 404 else "unmatched", str(code)) for _, path, _, code in cases)
    expected[("/v1/opinion", "500")] += 1
    expected[("/v1/generate", "200")] += 1
    for (endpoint, code), count in expected.items():
        assert after[endpoint][code] == before.get(endpoint, {}).get(code, 0) + count, (endpoint, code)


def test_a_generation_cut_by_the_replicas_shutdown_ends_with_an_error(server, tmp_path):
    """The pool replica's class outside Serve: its engine is stopped (as Serve's shutdown does) while a stream
    runs; the stream ends with EngineStopped (the router's 503), never an end event with partial text."""
    from serve.pool import ExpertPool
    from serve.protocol import GenerateEnd, GenerateJob, TokenPiece
    from workers.committees import Committee
    from workers.engine import EngineStopped

    write_experts(tmp_path, server["model"], ["Japan"])
    settings = pool_settings(server["model"], tmp_path)
    held, stopping = threading.Event(), threading.Event()

    def hold_at_the_third_token(generation, at):  # on the engine thread, mid-decode
        if at == "decode" and len(generation.tokens) == 2:
            held.set()
            stopping.wait()

    async def cut() -> tuple[list, BaseException | None]:
        pool = ExpertPool.func_or_class(settings)
        pool.engine.fault_hook = hold_at_the_third_token
        events = []

        async def read() -> None:
            async for item in pool.stream(
                GenerateJob(Committee([("Japan", 1.0)]), 12, prompt="Do you trust")
            ):
                events.append(item)

        reading = asyncio.ensure_future(read())
        await asyncio.to_thread(held.wait)
        stopper = threading.Thread(target=pool.__del__)  # Serve's shutdown: the engine stops
        stopper.start()
        engine = pool.engine

        def until_told_to_stop() -> None:  # the engine's condition: stop() notifies it
            with engine._lock:
                engine._lock.wait_for(lambda: engine._stopping)

        await asyncio.to_thread(until_told_to_stop)
        stopping.set()  # the held step ends; the engine thread sees the stop and leaves
        await asyncio.to_thread(stopper.join)
        try:
            await reading
        except EngineStopped as err:
            return events, err
        return events, None

    events, error = asyncio.run(cut())
    assert isinstance(error, EngineStopped)
    # Two tokens before the hold, the third picked by the held step; then the error, and no end event.
    assert [type(e) for e in events[1:]] == [TokenPiece] * 3 and not any(
        isinstance(e, GenerateEnd) for e in events
    )


def _serve_run(tmp_path: Path, model: Path, host: str, **serve) -> tuple[subprocess.Popen, Path, int]:
    """`serve run` of a Serve config built like serve/serve_config.yaml, for the tiny model, proxy on `host`."""
    write_experts(tmp_path / "experts", model, CULTURES[:1])
    config = tmp_path / "shores.yaml"
    config.write_text(
        yaml.safe_dump(serve_config(model, tmp_path, reload_interval_s=0, **serve).model_dump(mode="json"))
    )
    (port,) = free_ports(1)
    shipped = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    shipped["http_options"] = {"host": host, "port": port}
    shipped["applications"][0]["runtime_env"]["env_vars"]["SHORES_CONFIG"] = str(config)
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(shipped))
    log = tmp_path / "serve-run.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "serve"), "run", str(serve_yaml)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ
            | {"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"},  # its own Ray, never a neighbour's
        )
    return process, log, port


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # `serve run` shuts Serve and its Ray down on Ctrl-C
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def test_serve_run_refuses_an_open_host_without_a_key(server, tmp_path):
    process, log, _ = _serve_run(tmp_path, server["model"], "0.0.0.0")
    try:
        refusal = "listens on 0.0.0.0, reachable from other machines, and serve.auth.api_key_env is not set"
        wait_for(lambda: process.poll() is not None or refusal in log.read_text(), interval=1)
        assert refusal in log.read_text(), log.read_text()[-3000:]
        assert "ExposureError" in log.read_text()
    finally:
        _stop(process)


def test_serve_run_serves_the_built_config_on_loopback_with_its_rules(server, tmp_path):
    process, log, port = _serve_run(tmp_path, server["model"], "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(url + "/v1/status", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, interval=1)
        body = QUESTION | {"culture": CULTURES[0]}
        assert httpx.post(url + "/v1/opinion", json=body, timeout=60).status_code == 200
        rebound = httpx.post(url + "/v1/opinion", json=body, headers={"host": "attacker.example"}, timeout=60)
        assert rebound.status_code == 421
        plain = httpx.post(
            url + "/v1/opinion", content=json.dumps(body), headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415
    finally:
        _stop(process)
