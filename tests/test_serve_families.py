"""Sliding-window families served over real HTTP on 127.0.0.1: a tiny Gemma 3 (sliding and full layers) and
a tiny Mistral (every layer slides) answer /v1/opinion and a streamed chat, each answer as it is alone.

The window (16) is shorter than the long neighbour and the chat's text, so the windows really slide.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from tests.conftest import PROMPTS
from tests.serving import CULTURES, SIMILARITY, client, local_serve, serve_config, write_experts
from workers.tiny_model import save_tiny_model

pytestmark = pytest.mark.slow  # a local Serve for each family

QUESTION = {"question": "Do you think people can be trusted?", "options": ["Yes", "No", "Don't know"]}
LONG = {"question": " ".join(PROMPTS * 4), "options": ["Agree", "Disagree"]}
CHAT = {"model": "shores:kenya", "messages": [{"role": "user", "content": "Do you trust people?"}]}
LONG_CHAT = {"model": "shores:japan", "messages": [{"role": "user", "content": LONG["question"]}]}


@pytest.fixture(scope="module", params=["gemma3_text", "mistral"])
def server(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny_model(request.param, out / "model")
    write_experts(out / "experts", model_dir, CULTURES, similarity=SIMILARITY)
    config = serve_config(model_dir, out, reload_interval_s=0, max_new_tokens=48, default_max_new_tokens=8)
    with local_serve(config) as url:
        yield url


def test_opinions_answer_alone_as_beside_a_long_neighbour(server):
    with client(server) as http:

        def opinion(body):
            response = http.post("/v1/opinion", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        alone = opinion(QUESTION | {"culture": "Germany"})
        assert sum(alone["distribution"]) == pytest.approx(1, abs=1e-5)
        with ThreadPoolExecutor(2) as threads:
            together, _ = threads.map(
                opinion, [QUESTION | {"culture": "Germany"}, LONG | {"culture": "Japan"}]
            )
        np.testing.assert_allclose(together["distribution"], alone["distribution"], atol=1e-5)


def test_a_streamed_chat_is_the_whole_answer_alone_and_beside_a_long_neighbour(server):
    ai = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    ask = CHAT | {"max_tokens": 40, "temperature": 0}
    whole = ai.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "length"  # 40 tokens: past the window

    def streamed(body):
        return "".join(
            c.choices[0].delta.content or "" for c in ai.chat.completions.create(**body, stream=True)
        )

    with ThreadPoolExecutor(2) as threads:
        beside, _ = threads.map(streamed, [ask, LONG_CHAT | {"max_tokens": 30, "temperature": 0}])
    assert streamed(ask) == whole.message.content == beside
