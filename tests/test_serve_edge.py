"""The edge: refusals answered in Serve's proxy (serve/edge.py), over real HTTP on 127.0.0.1.

The proxy refuses what the router would refuse, with the router's status and words, and never reaches the
router for it: an unknown culture (404), a Host not served here (421), no key (401), a body not declared as
JSON (415). Anything else goes to the router: names it resolves, bodies it refuses for another reason, and a
culture published since the edge last asked (it catches up with the first answer that shows the new set).

Serve starts once for the module with the edge installed as `shores serve` installs it (the proxy's
middleware hook set before Ray starts), a key, and three experts from a folder reloaded every 0.2 s.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve.edge import EDGE_ENV, EDGE_HEADER, EDGE_IMPORT_PATH
from tests.conftest import free_ports
from tests.serving import CULTURES, SIMILARITY, client, local_serve, serve_config, wait_for, write_experts

pytestmark = pytest.mark.slow  # a local Serve

KEY_ENV, KEY = "SHORES_EDGE_TEST_KEY", "edge-key-42"
QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-edge")
    model = tiny_model_dirs["llama"]
    write_experts(out / "experts", model, CULTURES, similarity=SIMILARITY)
    config = serve_config(model, out, reload_interval_s=0.2, max_committee_size=3, api_key_env=KEY_ENV)
    (metrics,) = free_ports(1)
    os.environ[KEY_ENV], os.environ[EDGE_ENV] = KEY, EDGE_IMPORT_PATH  # before ray.init: the proxy inherits
    try:
        with local_serve(config, metrics_port=metrics) as url, client(url, KEY) as http:
            # The edge asks the router for its rules once the first request has come; until then it hands on.
            wait_for(
                lambda: refused_at_edge(http.post("/v1/opinion", json=QUESTION | {"culture": "Nowhere"}))
            )
            yield {"url": url, "http": http, "out": out, "model": model, "metrics": metrics}
    finally:
        del os.environ[KEY_ENV], os.environ[EDGE_ENV]


def refused_at_edge(response: httpx.Response) -> bool:
    return response.headers.get(EDGE_HEADER) == "refused"


def router_answered(http: httpx.Client) -> dict[str, dict[str, int]]:
    return http.get("/v1/status").json()["router"]["answered"]


def test_unknown_cultures_are_refused_at_the_edge_with_the_routers_answer(server):
    http = server["http"]
    before = http.get("/v1/status").json()
    flood = [QUESTION | {"culture": f"Narnia {i}"} for i in range(200)]
    with ThreadPoolExecutor(16) as threads:
        responses = list(threads.map(lambda body: http.post("/v1/opinion", json=body), flood))

    assert all(r.status_code == 404 and refused_at_edge(r) for r in responses)
    assert responses[7].json() == {
        "error": "unknown culture 'Narnia 7': no expert, and no survey similarity to the 3 experts"
    }
    generate = http.post("/v1/generate", json={"prompt": "Hello", "culture": "Narnia"})
    assert generate.status_code == 404 and refused_at_edge(generate)
    good = http.post("/v1/opinion", json=QUESTION | {"culture": "Japan"})
    assert good.status_code == 200 and not refused_at_edge(good)

    after = http.get("/v1/status").json()
    answered = before["router"]["answered"]["/v1/opinion"], after["router"]["answered"]["/v1/opinion"]
    assert answered[1].get("404", 0) == answered[0].get("404", 0)  # none of them reached the router
    assert answered[1]["200"] == answered[0].get("200", 0) + 1
    assert after["pool"]["calls"]["opinion"] == before["pool"]["calls"].get("opinion", 0) + 1

    def counted() -> float:  # the edge's refusals in Ray's Prometheus metrics
        lines = httpx.get(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).text.splitlines()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith("ray_shores_edge_refusals")
            and 'endpoint="/v1/opinion"' in line
            and 'status="404"' in line
        )

    assert wait_for(lambda: counted() >= len(flood))


def test_names_the_router_resolves_and_bodies_it_refuses_otherwise_pass_the_edge(server):
    http = server["http"]
    for name in ("japan", "DEU", "Federal Republic of Germany", "base", "Canada"):  # Canada: by similarity
        response = http.post("/v1/opinion", json=QUESTION | {"culture": name})
        assert response.status_code == 200 and not refused_at_edge(response), (name, response.text)
    by_text = http.post("/v1/opinion", json=QUESTION | {"profile": "A teacher in Osaka"})
    assert by_text.status_code == 200

    over_cap = http.post("/v1/opinion", json=QUESTION | {"culture": "Narnia", "committee_size": 4})
    assert over_cap.status_code == 422 and not refused_at_edge(over_cap)
    assert over_cap.json() == {"error": "committee_size 4 is over the cap of 3"}
    invalid = http.post("/v1/opinion", json={"question": "q?", "options": ["a"], "culture": "Narnia"})
    assert invalid.status_code == 422 and not refused_at_edge(invalid)
    malformed = http.post(
        "/v1/opinion", content=b'{"culture": "Narnia", ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and not refused_at_edge(malformed)


def test_host_key_and_content_type_are_refused_at_the_edge(server):
    http, url = server["http"], server["url"]
    before = router_answered(http)["/v1/opinion"]
    good = QUESTION | {"culture": "Japan"}

    rebound = http.post("/v1/opinion", json=good, headers={"host": "attacker.example"})
    assert rebound.status_code == 421 and refused_at_edge(rebound)
    assert rebound.json() == {
        "error": "Host 'attacker.example' is not served here (serve.auth.allowed_hosts)"
    }
    with client(url) as anonymous:
        no_key = anonymous.post("/v1/opinion", json=good)
        wrong_key = anonymous.post("/v1/opinion", json=good, headers={"authorization": "Bearer nope"})
        assert anonymous.get("/healthz").status_code == 200  # not a path the edge judges
    for response in (no_key, wrong_key):
        assert response.status_code == 401 and refused_at_edge(response)
        assert response.headers["www-authenticate"] == "Bearer"
    plain = http.post("/v1/opinion", content=b"{}", headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and refused_at_edge(plain)
    assert "application/json" in plain.json()["error"]

    assert router_answered(http)["/v1/opinion"] == before  # none of them reached the router


def test_a_culture_published_later_passes_the_edge_once_an_answer_shows_it(server):
    http = server["http"]
    refused = http.post("/v1/opinion", json=QUESTION | {"culture": "Peru"})
    assert refused.status_code == 404 and refused_at_edge(refused)

    write_experts(server["out"] / "experts", server["model"], ["Peru"], seed=5)
    # The router sees the new set on its refresh; its answer that shows it brings the edge up to date.
    wait_for(lambda: "Peru" in {e["culture"] for e in http.get("/v1/experts").json()["experts"]})
    answered = http.post("/v1/opinion", json=QUESTION | {"culture": "Peru"})
    assert answered.status_code == 200 and not refused_at_edge(answered), answered.text
    assert answered.json()["committee"][0]["culture"] == "Peru"
