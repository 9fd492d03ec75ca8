"""The Serve graph over real HTTP on 127.0.0.1: routing, committees, batching across experts, the contract's
errors, bearer auth, the OpenAI client, reload of a new expert, and the Serve config/build.

Serve starts once for the module (a local Ray, a tiny random Llama, three experts with random prompts).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, TINY_CONFIG
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
from workers.cultures import SHARED

pytestmark = pytest.mark.slow  # a local Serve for the module (the last test drives a pool replica without it)

KEY_ENV, KEY = "SHORES_TEST_API_KEY", "test-key-123"
QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}
# Cultures without an expert that the profiles below name: answered by committees, as `culture` would be.
NAMED_ONLY = {
    c: {"Germany": 0.5 + i / 20, "Japan": 0.6, "Kenya": 0.9 - i / 20}
    for i, c in enumerate(["Australia", "United States", "South Korea", "Nigeria", "Russia", "Jordan"])
}


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    write_experts(out / "experts", tiny_model_dirs["llama"], CULTURES, similarity=SIMILARITY | NAMED_ONLY)
    config = serve_config(
        tiny_model_dirs["llama"],
        out,
        reload_interval_s=1,
        max_body_bytes=4096,
        max_new_tokens=32,
        default_max_new_tokens=6,
        api_key_env=KEY_ENV,
    )
    os.environ[KEY_ENV] = KEY  # before ray.init: the replicas inherit it
    try:
        with local_serve(config) as url:
            yield {"url": url, "out": out, "model": tiny_model_dirs["llama"]}
    finally:
        del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def http(server):
    with client(server["url"], KEY) as c:
        yield c


def opinion(http, **body):
    response = http.post("/v1/opinion", json=QUESTION | body)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_models_and_experts(http, server):
    with client(server["url"]) as anonymous:  # liveness needs no key, and tells nothing more
        health = anonymous.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert anonymous.get("/v1/status").status_code == 401
        assert anonymous.get("/docs").status_code == 404  # off unless serve.deployment.docs
        assert anonymous.get("/openapi.json").status_code == 404
    assert http.get("/v1/status").json()["pool"]["pid"] > 0

    models = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"shores:auto", "shores:base", "shores:germany", "shores:japan", "shores:kenya"} <= models

    experts = http.get("/v1/experts").json()
    by_culture = {e["culture"]: e for e in experts["experts"]}
    assert set(CULTURES) <= set(by_culture)
    assert all(e["version"].startswith("sha256:") and e["descriptor"] for e in by_culture.values())
    assert {"Brazil", "Canada"} <= set(experts["committee_cultures"])


def test_a_culture_with_an_expert_gets_that_expert(http):
    answer = opinion(http, culture="germany")  # names fold case
    assert answer["model"] == "shores:germany"
    assert [(m["culture"], m["weight"]) for m in answer["committee"]] == [("Germany", 1.0)]
    assert answer["committee"][0]["version"].startswith("sha256:")
    assert len(answer["distribution"]) == 3 and abs(sum(answer["distribution"]) - 1) < 1e-6


def test_a_culture_without_one_gets_its_nearest_experts_mixed(http):
    answer = opinion(http, culture="Canada")
    members = answer["committee"]
    assert [m["culture"] for m in members] == ["Germany", "Kenya", "Japan"]  # by survey similarity
    weights = [m["weight"] for m in members]
    assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) < 1e-5
    alone = {m["culture"]: np.array(opinion(http, culture=m["culture"])["distribution"]) for m in members}
    mixture = sum(m["weight"] * alone[m["culture"]] for m in members)
    np.testing.assert_allclose(answer["distribution"], mixture, atol=1e-5)

    two = opinion(http, culture="Brazil", committee_size=2)
    assert [m["culture"] for m in two["committee"]] == ["Kenya", "Japan"]


# Profiles a user sent (issue 29) that the embedding alone routed elsewhere, with the culture each names.
NAMED = {
    "A Canadian lumberjack in British Columbia.": "Canada",
    "An Australian nurse in Perth.": "Australia",
    "A surfer from Sydney.": "Australia",
    "I'm a hockey coach in Toronto.": "Canada",
    "Je suis infirmière à Montréal.": "Canada",
    "A rancher from Texas.": "United States",
    "A fisherman from Busan.": "South Korea",
    "A trader in Kano market.": "Nigeria",
    "A factory worker from Yekaterinburg.": "Russia",
    "أنا طالب في جامعة اليرموك في إربد": "Jordan",  # a student at Yarmouk University in Irbid
}


def test_a_profile_that_names_a_place_is_answered_as_its_culture(http):
    for profile, culture in NAMED.items():
        answer = opinion(http, profile=profile)
        assert answer["model"] == "shores:auto"
        assert answer["routing"]["found"] == culture and answer["routing"]["method"] == "place", profile
        assert answer["routing"]["evidence"], profile
        asked = opinion(http, culture=culture)
        assert answer["committee"] == asked["committee"], profile
        np.testing.assert_allclose(answer["distribution"], asked["distribution"], atol=1e-6)
    assert opinion(http, culture="Japan")["routing"] == {
        "found": "Japan",
        "evidence": ['culture "Japan"'],
        "method": "culture",
    }


def test_a_profile_that_names_no_place_routes_by_sentence_embedding(http):
    answer = opinion(http, profile="I eat sushi for lunch and take the shinkansen to work.")
    assert answer["model"] == "shores:auto"
    assert answer["routing"] == {"found": None, "evidence": [], "method": "embedding"}
    assert answer["committee"][0]["culture"] == "Japan" and len(answer["committee"]) == 3
    by_language = opinion(http, profile="Ich arbeite als Lehrerin in einem kleinen Dorf.")
    assert by_language["routing"]["method"] == "language" and by_language["routing"]["found"] == "Germany"
    base = opinion(http, culture="base")
    assert base["committee"] == [{"culture": "base", "weight": 1.0, "version": "base"}]


def test_each_request_answers_as_it_would_alone_beside_others(http):
    """Concurrent requests for different experts share the engine's forward passes (that they do is tested
    with the gate in test_serve_limits.py, where arrivals are not left to timing) and answer as alone."""
    requests = [
        {"culture": "Germany"},
        {"culture": "Japan", "question": "How important is religion in your life?"},
        {"culture": "Kenya", "options": ["Agree", "Disagree"]},
        {"culture": "Canada"},
        {"culture": "base"},
        {"culture": "Japan"},
    ]
    alone = [opinion(http, **r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as threads:
        together = list(threads.map(lambda r: opinion(http, **r), requests))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a["distribution"], b["distribution"], atol=1e-5)
        assert a["committee"] == b["committee"]

    prompts = [{"prompt": "Answer: A", "culture": c} for c in ("Germany", "Kenya", "Brazil")]
    prompts.append({"prompt": "How important is religion", "culture": "Japan", "temperature": 0.9, "seed": 4})

    def generate(body: dict) -> dict:
        return http.post("/v1/generate", json=body).json()

    alone = [generate(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as threads:
        together = list(threads.map(generate, prompts))
    assert [a["text"] for a in alone] == [t["text"] for t in together]


def test_generate_answers_with_its_committee(http):
    answer = http.post(
        "/v1/generate", json={"prompt": "Do you trust", "culture": "Canada", "max_new_tokens": 4}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert isinstance(body["text"], str) and body["finish_reason"] in ("length", "stop")
    assert body["model"] == "shores:canada" and len(body["committee"]) == 3
    seeded = {
        "prompt": "Do you trust",
        "culture": "Kenya",
        "temperature": 1.0,
        "seed": 7,
        "max_new_tokens": 8,
    }
    assert (
        http.post("/v1/generate", json=seeded).json()["text"]
        == http.post("/v1/generate", json=seeded).json()["text"]
    )


BAD = [
    ("/v1/opinion", b'{"question": ', 400, "malformed JSON"),
    ("/v1/opinion", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/opinion", {"options": ["a", "b"]}, 422, "question: Field required"),
    ("/v1/opinion", QUESTION | {"contry": "Japan"}, 422, "contry: Extra inputs are not permitted"),
    ("/v1/opinion", QUESTION | {"culture": "Atlantis"}, 404, "unknown culture 'Atlantis'"),
    (
        "/v1/opinion",
        {"question": "  ", "options": ["a", "b"]},
        422,
        "question: Value error, must not be empty",
    ),
    ("/v1/opinion", {"question": "q", "options": [str(i) for i in range(27)]}, 422, "too many options: 27"),
    ("/v1/opinion", {"question": "q" * 5000, "options": ["a", "b"]}, 413, "over the cap of 4096"),
    ("/v1/opinion", QUESTION | {"committee_size": 0}, 422, "committee_size"),
    ("/v1/opinion", QUESTION | {"committee_size": 9}, 422, "committee_size 9 is over the cap of 8"),
    ("/v1/opinion", b"[" * 4000, 400, "nested too deeply"),
    ("/v1/generate", {"prompt": "hi", "seed": 2**63}, 422, "seed: Input should be less than"),
    ("/v1/generate", {"prompt": "hi", "seed": -1}, 422, "seed: Input should be greater than"),
    ("/v1/generate", {"prompt": ""}, 422, "prompt: Value error, must not be empty"),
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": 33}, 422, "max_new_tokens 33 is over the cap of 32"),
    (
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "unknown model",
    ),
    ("/v1/chat/completions", {"model": "shores:auto", "messages": []}, 422, "messages"),
    (
        "/v1/chat/completions",
        {"model": "shores:auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        422,
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"model": "shores:auto", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
        422,
        "seed",
    ),
    ("/v1/generate", {"prompt": "hi", "stream": True, "max_new_tokens": 33}, 422, "max_new_tokens 33"),
    ("/v1/generate", {"prompt": "yes " * 600, "stream": True}, 422, "over the limit of"),  # from the pool
    (
        "/v1/chat/completions",
        {"model": "shores:atlantis", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        404,
        "unknown culture",
    ),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[b[3] for b in BAD])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(http, path, body, status, message):
    if isinstance(body, bytes):  # sent as JSON, as declared, whatever it holds
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()[
        "error"
    ]  # OpenAI's shape on the OpenAI paths: {"message", "type", "param", "code"}
    assert message in (error["message"] if path == "/v1/chat/completions" else error)
    opinion(http, culture="Japan")


def test_wrong_method_and_missing_or_wrong_key(server):
    with client(server["url"]) as anonymous:
        assert anonymous.get("/v1/opinion").status_code == 405
        missing = anonymous.post("/v1/opinion", json=QUESTION)
        assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
    with client(server["url"], "wrong") as wrong:
        assert wrong.get("/v1/models").status_code == 401


def test_the_openai_client_talks_to_the_server(server):
    import openai

    ai = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    assert "shores:kenya" in {m.id for m in ai.models.list()}
    reply = ai.chat.completions.create(
        model="shores:kenya",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Do you trust people?"},
        ],
        max_tokens=5,
        temperature=0,
    )
    assert reply.model == "shores:kenya" and reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens <= 5
    assert reply.model_extra["committee"][0]["culture"] == "Kenya"

    auto = ai.chat.completions.create(
        model="shores:auto",
        messages=[{"role": "user", "content": "I am a farmer near Nairobi."}],
        max_tokens=3,
        seed=1,
    )
    assert auto.model == "shores:auto" and auto.model_extra["committee"][0]["culture"] == "Kenya"

    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        ai.chat.completions.create(
            model="shores:japan", messages=[{"role": "user", "content": "hi"}], max_tokens=999
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="nope", max_retries=0).models.list()


def _events(response) -> list:
    """The JSON objects of a server-sent event stream, and "[DONE]" for its end marker."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line  # events are `data:` lines, each followed by a blank line
    return events


def test_the_openai_client_streams_what_it_gets_whole(server):
    import openai

    ai = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    for model, messages in [
        ("shores:japan", [{"role": "user", "content": "Do you trust people?"}]),
        ("shores:canada", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    ]:
        ask = {"model": model, "messages": messages, "max_tokens": 24, "temperature": 0}
        whole = ai.chat.completions.create(**ask)
        chunks = list(ai.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].model_extra["committee"] == whole.model_extra["committee"]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content  # greedy: the same tokens, the same text
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # asked for: the last chunk
        assert all(c.usage is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    plain = list(ai.chat.completions.create(**ask, stream=True))  # no usage unless asked
    assert all(c.choices and c.usage is None for c in plain)


def test_generate_streams_one_event_a_token(http):
    body = {"prompt": "How important is religion", "culture": "Kenya", "max_new_tokens": 12}
    whole = http.post("/v1/generate", json=body).json()
    with http.stream("POST", "/v1/generate", json=body | {"stream": True}) as response:
        events = _events(response)
    assert events[-1] == "[DONE]"
    *tokens, last = events[:-1]
    assert all(set(e) == {"token", "text"} for e in tokens)
    assert last["completion_tokens"] == len(tokens) and last["finish_reason"] == whole["finish_reason"]
    assert "".join(e["text"] for e in [*tokens, last]) == whole["text"]
    assert {k: last[k] for k in ("committee", "model", "experts_version")} == {
        k: whole[k] for k in ("committee", "model", "experts_version")
    }


def test_a_new_expert_is_served_without_a_restart(http, server):
    assert http.post("/v1/opinion", json=QUESTION | {"culture": "Peru"}).status_code == 404
    version = http.get("/v1/experts").json()["experts_version"]
    write_experts(server["out"] / "experts", server["model"], ["Peru"], seed=9)
    answer = wait_for(
        lambda: (
            (r := http.post("/v1/opinion", json=QUESTION | {"culture": "Peru"})).status_code == 200
            and r.json()
        )
    )
    assert answer["committee"][0]["culture"] == "Peru" and answer["committee"][0]["version"].startswith(
        "sha256:"
    )
    assert answer["experts_version"] != version
    generated = http.post("/v1/generate", json={"prompt": "Do you trust", "culture": "Peru"})  # the new bank
    assert generated.status_code == 200 and generated.json()["committee"][0]["culture"] == "Peru"
    assert wait_for(lambda: http.get("/v1/experts").json()["experts_version"] == answer["experts_version"])


def test_an_expert_answers_with_its_share_of_the_shared_prior(http, server):
    # The prior, then Chile's expert fitted to keep a quarter of it: Chile is answered by both, mixed.
    write_experts(server["out"] / "experts", server["model"], [SHARED], seed=11)
    prior = wait_for(
        lambda: (
            (r := http.post("/v1/opinion", json=QUESTION | {"culture": SHARED})).status_code == 200
            and r.json()
        )
    )
    write_experts(server["out"] / "experts", server["model"], ["Chile"], seed=12, prior_weight=0.25)
    answer = wait_for(
        lambda: (
            (r := http.post("/v1/opinion", json=QUESTION | {"culture": "Chile"})).status_code == 200
            and r.json()
        )
    )
    assert {m["culture"]: m["weight"] for m in answer["committee"]} == {"Chile": 0.75, SHARED: 0.25}
    assert answer["model"] == "shores:chile" and abs(sum(answer["distribution"]) - 1) < 1e-6
    assert not np.allclose(answer["distribution"], prior["distribution"])
    # One share whatever the options: a scale, with or without a missing-value code, gets the same committee.
    for options in (
        ["1 Not at all", "2", "3", "4 Completely"],
        ["1 Not at all", "2", "3", "4 Completely", "Don't know"],
    ):
        scale = opinion(http, culture="Chile", options=options)
        assert {m["culture"]: m["weight"] for m in scale["committee"]} == {"Chile": 0.75, SHARED: 0.25}
    cards = {e["culture"]: e for e in http.get("/v1/experts").json()["experts"]}
    assert cards["Chile"]["prior_weight"] == 0.25 and cards["Germany"]["prior_weight"] == 0.0
    # The prior's own weight (0 here) keeps it out of committees; Germany, weight 0, still answers alone.
    assert SHARED not in {m["culture"] for m in opinion(http, culture="Canada")["committee"]}
    assert [m["culture"] for m in opinion(http, culture="Germany")["committee"]] == ["Germany"]


def test_serve_build_writes_a_config_for_the_exported_app(server, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from ray.serve.schema import ServeDeploySchema
    from ray.serve.scripts import cli

    config = tmp_path / "serve.yaml"
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    tiny["base_model"]["name"] = str(server["model"])
    tiny["serve"] = {
        "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "gpus_per_replica": 0}
    }
    config.write_text(yaml.safe_dump(tiny))
    monkeypatch.setenv("SHORES_CONFIG", str(config))
    out = tmp_path / "built.yaml"
    result = CliRunner().invoke(cli, ["build", "serve.app:app", "-o", str(out)])
    assert result.exit_code == 0, result.output
    built = yaml.safe_load(out.read_text())
    assert built["applications"][0]["import_path"] == "serve.app:app"
    deployments = {d["name"]: d for d in built["applications"][0]["deployments"]}
    assert set(deployments) == {"Router", "ExpertPool"}
    assert (
        deployments["ExpertPool"]["autoscaling_config"]["max_replicas"] == 3
    )  # from the config's serve section
    assert deployments["ExpertPool"]["ray_actor_options"]["num_gpus"] == 0

    shipped = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(shipped)
    assert shipped["http_options"]["host"] == "127.0.0.1"
    assert shipped["applications"][0]["import_path"] == "serve.app:app"


def test_the_engine_refuses_alone_a_committee_whose_experts_are_not_loaded(tiny_model_dirs, tmp_path):
    """A reload can race the router: a committee naming an expert the replica has not loaded gets the typed
    error that the router answers with 409, and its neighbours are answered as usual."""
    import asyncio

    from serve.pool import ExpertPool
    from serve.protocol import ExpertsNotLoadedError, GenerateAnswer, GenerateJob, OpinionAnswer, OpinionJob
    from workers.committees import Committee

    write_experts(tmp_path, tiny_model_dirs["llama"], ["Japan"])
    settings = pool_settings(tiny_model_dirs["llama"], tmp_path)
    opinions = [
        OpinionJob(QUESTION["question"], QUESTION["options"], Committee([(culture, 1.0)]))
        for culture in ("Japan", "Peru")
    ]
    generation = GenerateJob(Committee([("Peru", 0.5), ("Japan", 0.5)]), 4, prompt="Do you trust")

    async def together() -> list:
        pool = ExpertPool.func_or_class(settings)  # the replica's class, outside Serve: its engine runs
        try:
            jobs = [pool.opinion(j) for j in opinions] + [pool.generate(generation)]
            jobs.append(pool.generate(GenerateJob(Committee([("Japan", 1.0)]), 4, prompt="Do you trust")))
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            pool.__del__()  # as Serve does on shutdown: the engine stops

    japan, peru, mixed, alone = asyncio.run(together())
    assert isinstance(japan, OpinionAnswer) and sum(japan.distribution) == pytest.approx(1)
    assert japan.versions["Japan"].startswith("sha256:")
    assert isinstance(peru, ExpertsNotLoadedError) and peru.message.startswith(
        "experts ['Peru'] are not loaded"
    )
    assert isinstance(mixed, ExpertsNotLoadedError)
    assert isinstance(alone, GenerateAnswer)
    assert [(c.completion_tokens, c.finish_reason) for c in alone.choices] == [(4, "length")]
