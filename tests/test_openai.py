"""OpenAI conformance over real HTTP on 127.0.0.1, through the `openai` client and LangChain's ChatOpenAI:
`stop`, `top_p`, `logprobs`, `n`, /v1/completions, and a 400 for every field that would change the output.

Serve starts once for the module (a local Ray, a tiny random Llama, three experts with random prompts, no
key, the default exposure rules). The model is random, so its texts mean nothing; each test compares the
server with itself (a stop string taken from the text it gave without one, a seed's choice with the same seed
alone), which holds whatever the text.
"""

import httpx
import openai
import pytest

from tests.serving import CULTURES, SIMILARITY, local_serve, serve_config, write_experts

pytestmark = pytest.mark.slow  # a local Serve for the module

MAX_CHOICES = 3
CHAT = {"model": "shores:kenya", "messages": [{"role": "user", "content": "Do you trust people?"}]}


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("openai")
    write_experts(out / "experts", tiny_model_dirs["llama"], CULTURES, similarity=SIMILARITY)
    config = serve_config(
        tiny_model_dirs["llama"],
        out,
        reload_interval_s=0,
        max_new_tokens=32,
        default_max_new_tokens=8,
        max_choices=MAX_CHOICES,
    )
    with local_serve(config) as url:
        yield url


@pytest.fixture(scope="module")
def ai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _stop_string(text: str) -> tuple[str, str]:
    """A stop string taken from inside `text`, and the text before its first occurrence."""
    assert len(text) >= 6, text
    stop = text[3:5]
    return stop, text[: text.find(stop)]


def test_stop_cuts_the_text_before_the_stop_string_whole_and_streamed(ai):
    ask = CHAT | {"max_tokens": 24, "temperature": 0}
    free = ai.chat.completions.create(**ask).choices[0].message.content
    stop, before = _stop_string(free)
    cut = ai.chat.completions.create(**ask, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == before and cut.choices[0].finish_reason == "stop"
    chunks = list(ai.chat.completions.create(**ask, stop=stop, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == before  # the stream never sent text past the stop string
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]


def test_top_p_samples_from_the_nucleus(ai):
    ask = CHAT | {"max_tokens": 16, "seed": 3}
    greedy = ai.chat.completions.create(**ask, temperature=0).choices[0].message.content
    hot = ai.chat.completions.create(**ask, temperature=2).choices[0].message.content
    narrowed = ai.chat.completions.create(**ask, temperature=2, top_p=1e-6).choices[0].message.content
    assert hot != greedy  # sampling at temperature 2 wanders off ...
    assert narrowed == greedy  # ... unless the nucleus holds the most likely token only


def test_logprobs_are_the_committees_per_token(ai):
    reply = ai.chat.completions.create(
        **CHAT | {"model": "shores:canada"}, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    [choice] = reply.choices
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    text = bytes(b for entry in entries for b in entry.bytes).decode("utf-8", errors="replace")
    if "\ufffd" not in choice.message.content:  # a character left incomplete may decode otherwise
        assert text == choice.message.content

    streamed = list(
        ai.chat.completions.create(**CHAT, max_tokens=12, temperature=0, logprobs=True, stream=True)
    )
    tokens = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    whole = ai.chat.completions.create(**CHAT, max_tokens=12, temperature=0, logprobs=True).choices[0]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in whole.logprobs.content]
    assert whole.logprobs.content[0].top_logprobs == []  # logprobs without top_logprobs: none listed


def test_n_gives_choices_with_their_own_seeds(ai):
    ask = CHAT | {"max_tokens": 10, "temperature": 1.5, "seed": 11}
    alone = ai.chat.completions.create(**ask).choices[0].message.content
    reply = ai.chat.completions.create(**ask, n=3, logprobs=True)
    texts = [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert (
        texts[0] == alone and len(set(texts)) == 3
    )  # the first is the request's own seed, the others differ
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    assert reply.choices[0].finish_reason in ("stop", "length")

    streamed = {i: "" for i in range(3)}
    finished = []
    for chunk in ai.chat.completions.create(**ask, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            finished += [choice.index] if choice.finish_reason else []
    assert [streamed[i] for i in range(3)] == texts and sorted(finished) == [0, 1, 2]

    with pytest.raises(openai.UnprocessableEntityError, match="n 4 is over the cap of 3"):
        ai.chat.completions.create(**ask, n=MAX_CHOICES + 1)


def test_completions_continue_a_prompt(ai, server):
    ask = {"model": "shores:kenya", "prompt": "Do you trust", "max_tokens": 12, "temperature": 0}
    reply = ai.completions.create(**ask)
    generated = httpx.post(
        server + "/v1/generate", json={"prompt": "Do you trust", "culture": "Kenya", "max_new_tokens": 12}
    ).json()
    [choice] = reply.choices
    assert reply.object == "text_completion" and reply.model == "shores:kenya"
    assert choice.text == generated["text"]  # the same raw continuation as shores' own endpoint
    assert reply.usage.prompt_tokens > 0 and reply.model_extra["committee"][0]["culture"] == "Kenya"

    stop, before = _stop_string(choice.text)
    cut = ai.completions.create(**ask, stop=stop, logprobs=2)
    assert cut.choices[0].text == before and cut.choices[0].finish_reason == "stop"
    logprobs = cut.choices[0].logprobs
    assert (
        len(logprobs.tokens)
        == len(logprobs.token_logprobs)
        == len(logprobs.top_logprobs)
        == cut.usage.completion_tokens
    )
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)

    chunks = list(ai.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_auto_routes_chats_and_generations_by_the_place_they_name(ai, server):
    """shores:auto reads the conversation's text as /v1/opinion reads a profile, whole and streamed; so does
    /v1/generate without a culture."""
    messages = [
        {"role": "system", "content": "You answer survey questions."},
        {"role": "user", "content": "I'm a nurse in Munich. Do you trust people?"},
    ]
    ask = {"model": "shores:auto", "messages": messages, "max_tokens": 4, "temperature": 0}
    reply = ai.chat.completions.create(**ask)
    routing = {"found": "Germany", "evidence": ['city "Munich"'], "method": "place"}
    assert reply.model_extra["routing"] == routing
    assert [m["culture"] for m in reply.model_extra["committee"]] == ["Germany"]
    as_germany = ai.chat.completions.create(**ask | {"model": "shores:germany"})
    assert reply.choices[0].message.content == as_germany.choices[0].message.content
    chunks = list(ai.chat.completions.create(**ask, stream=True))
    assert chunks[0].model_extra["routing"] == routing  # shores' fields come with the first chunk

    generated = httpx.post(
        server + "/v1/generate", json={"prompt": "A teacher from Nairobi says", "max_new_tokens": 3}
    )
    routed = generated.json()["routing"]
    assert routed["found"] == "Kenya" and routed["method"] == "place"
    assert routed["evidence"] == ['region "Nairobi"']  # Nairobi is a city and a county: the stronger reading
    streamed = httpx.post(
        server + "/v1/generate",
        json={"prompt": "A teacher from Nairobi says", "max_new_tokens": 3, "stream": True},
    )
    last = [line for line in streamed.text.splitlines() if line.startswith("data: {")][-1]
    assert '"routing": {"found": "Kenya"' in last


REFUSED = [
    (
        {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]},
        "tools",
    ),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"50": 5}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"extra_body": {"guided_json": {}}}, "unknown field 'guided_json'"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ]
        },
        "image_url parts are not supported",
    ),
]


@pytest.mark.parametrize("fields, named", REFUSED, ids=[n for _, n in REFUSED])
def test_a_field_that_would_change_the_output_is_a_400_naming_it(ai, fields, named):
    with pytest.raises(openai.BadRequestError, match=named):
        ai.chat.completions.create(**CHAT | fields)


def test_harmless_fields_are_accepted_and_completions_refuse_echo(ai):
    reply = ai.chat.completions.create(
        **CHAT, max_tokens=3, user="u-1", metadata={"team": "a"}, store=False, service_tier="auto"
    )
    assert reply.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        ai.completions.create(model="shores:kenya", prompt="Hi", echo=True)


def test_cors_is_off_by_default(server):
    preflight = httpx.options(
        server + "/v1/chat/completions",
        headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers and preflight.status_code == 405
    assert preflight.json()["error"]


def test_langchain_chat_openai_session_with_stop_and_streaming(server):
    """A short scripted session of another OpenAI client of the ecosystem (LangChain's ChatOpenAI)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="shores:japan",
        base_url=server + "/v1",
        api_key="unused",
        temperature=0,
        max_tokens=20,
        max_retries=0,
    )
    question = "How important is religion in your life?"
    free = llm.invoke(question).content
    stop, before = _stop_string(free)
    assert llm.invoke(question, stop=[stop]).content == before
    streamed = [chunk.content for chunk in llm.stream(question, stop=[stop])]
    assert "".join(streamed) == before and len(streamed) > 1
    conversation = [
        SystemMessage("Answer briefly."),
        HumanMessage(question),
        AIMessage(before),
        HumanMessage("And why?"),
    ]
    reply = llm.invoke(conversation)
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.response_metadata["model_name"] == "shores:japan"
