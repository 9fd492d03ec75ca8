"""The HTTP surface's rules on their own (no Serve): which OpenAI fields are honoured or refused, which Host
names are answered, where the open-host rule refuses, what a failed pool call becomes, the checks the router
and the edge share, and how the edge paces a client's refusals."""

import pytest

from serve.edge import MAX_HOLD_S, RefusalPace
from serve.errors import ApiError
from serve.exposure import allowed_host_names, host_name, open_host_refusal
from serve.openai_fields import refuse_unsupported
from serve.pool_client import pool_error
from serve.request_checks import (
    bearer_refusal,
    host_refusal,
    key_digest,
    media_type_refusal,
    text_refusal,
)
from serve.settings import ServeSection
from workers.engine import EngineStopped

CHAT = {"model": "shores:kenya", "messages": [{"role": "user", "content": "Hi"}]}

REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported"),
    ({"tool_choice": "auto"}, "tool_choice is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format is not supported"),
    ({"logit_bias": {"50": 10}}, "logit_bias is not supported"),
    ({"functions": [{"name": "f"}]}, "functions is not supported"),
    ({"function_call": "auto"}, "function_call is not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty is not supported"),
    ({"modalities": ["text", "audio"]}, "modalities is not supported"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio is not supported"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction is not supported"),
    ({"reasoning_effort": "high"}, "reasoning_effort is not supported"),
    ({"temprature": 0.5}, "unknown field 'temprature'"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "content[0]",
    ),
    ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "tool", "content": "a", "tool_call_id": "1"}]}, "messages[0].role"),
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[m for _, m in REFUSED])
def test_a_chat_field_that_would_change_the_output_is_a_400_naming_it(fields, message):
    with pytest.raises(ApiError) as refused:
        refuse_unsupported(CHAT | fields, "chat")
    assert refused.value.status == 400 and message in refused.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"},
        {"tools": None, "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}},
        {
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "modalities": ["text"],
            "parallel_tool_calls": True,
        },
        {
            "stop": ["\n"],
            "n": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "top_p": 0.9,
            "seed": 1,
            "stream": True,
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": None}]},
    ],
)
def test_fields_honoured_or_holding_their_no_op_value_pass(fields):
    refuse_unsupported(CHAT | fields, "chat")


def test_completions_refuse_what_needs_prompt_logprobs_or_token_ids():
    prompt = {"model": "shores:kenya", "prompt": "Hi"}
    refuse_unsupported(prompt | {"logprobs": 2, "best_of": 2, "n": 2, "echo": False}, "completions")
    for fields, message in [
        ({"echo": True}, "echo is not supported"),
        ({"best_of": 3, "n": 1}, "best_of is not supported"),
        ({"suffix": "end"}, "suffix is not supported"),
        ({"prompt": [1, 2, 3]}, "token ids are not supported"),
        ({"messages": []}, "unknown field 'messages'"),
    ]:
        with pytest.raises(ApiError, match=message):
            refuse_unsupported(prompt | fields, "completions")


@pytest.mark.parametrize(
    "header, name",
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("localhost.:80", "localhost"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("evil.example:8000", "evil.example"),
        ("", None),
        ("a:b", None),
        ("[::1]x", None),
        (":80", None),
    ],
)
def test_host_header_names(header, name):
    assert host_name(header) == name


def test_allowed_host_names_default_to_loopback_and_the_listening_address():
    assert allowed_host_names(ServeSection(), "127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    listed = allowed_host_names(ServeSection(deployment={"host": "10.0.0.5"}), "0.0.0.0")
    assert listed >= {"10.0.0.5", "localhost"}
    assert "0.0.0.0" not in allowed_host_names(ServeSection(), "0.0.0.0")
    named = ServeSection(auth={"allowed_hosts": ["API.example"]})
    assert allowed_host_names(named, "0.0.0.0") == {"api.example"}
    assert allowed_host_names(ServeSection(auth={"allowed_hosts": ["*"]}), "0.0.0.0") is None


def test_an_open_host_needs_a_key_or_a_deliberate_opt_out():
    assert "listens on 0.0.0.0" in open_host_refusal("0.0.0.0", ServeSection())
    assert open_host_refusal("127.0.0.1", ServeSection()) is None
    assert open_host_refusal("0.0.0.0", ServeSection(auth={"api_key_env": "KEY"})) is None
    assert open_host_refusal("0.0.0.0", ServeSection(auth={"allow_unauthenticated": True})) is None


def test_a_replica_shutting_down_is_a_503_to_retry():
    from ray.serve.exceptions import BackPressureError

    section = ServeSection(deployment={"retry_after_s": 2})
    stopped = pool_error(EngineStopped("the engine stopped"), section)
    assert (
        stopped.status == 503
        and stopped.headers == {"Retry-After": "2"}
        and "shutting down" in stopped.message
    )
    assert pool_error(BackPressureError(num_queued_requests=1, max_queued_requests=1), section).status == 503
    assert pool_error(KeyError("a bug"), section) is None  # not the pool's: re-raised, a counted JSON 500


def test_the_edge_paces_one_clients_refusals_after_a_burst():
    pace = RefusalPace(max_clients=3)
    waits = [pace.wait("10.0.0.1", 10, now=0.0) for _ in range(15)]
    assert waits[:11] == [0.0] * 11  # a second's worth at once
    assert waits[11:] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # then 10 a second
    assert pace.wait("10.0.0.2", 10, now=0.0) == 0.0  # each address has its own pace
    assert pace.wait("10.0.0.1", 10, now=60.0) == 0.0  # a client that stopped gets its burst back
    flood = [pace.wait("10.0.0.3", 10, now=0.0) for _ in range(500)]
    assert max(flood) == MAX_HOLD_S  # held at most this long, however many wait
    assert pace.wait("10.0.0.4", 0, now=0.0) == 0.0  # rate 0: no limit
    assert len(pace.due) == 3  # the least recently refused address is forgotten


def test_the_shared_checks_answer_as_the_router_does():
    digest = key_digest("s3cret")
    assert bearer_refusal("Bearer s3cret", digest) is None
    assert bearer_refusal("Bearer s3cret", None) is None
    assert bearer_refusal("Basic s3cret", digest).status == 401
    assert media_type_refusal("application/json; charset=UTF-8") is None
    assert media_type_refusal("text/plain").status == 415
    assert host_refusal("evil.example:80", frozenset({"localhost"})).status == 421
    assert host_refusal(None, frozenset({"localhost"})).status == 400
    assert host_refusal("evil.example", None) is None
    assert text_refusal({"a": ["ok", "\ud800"]}).status == 400
