"""The prompt text of a conversation: the same for training, evaluation and serving, with no default system text."""

import pytest

from workers.chat import chat_prompt
from workers.scoring import question_text
from workers.tiny_model import tiny_tokenizer

# SmolLM2's template, shortened: a conversation that opens without a system message gets the default one.
DEFAULT_SYSTEM = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|system|>You are SmolLM.\n{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Gemma's kind: a template with no system role refuses one.
NO_SYSTEM_ROLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_without_a_template_a_conversation_is_plain_role_lines(tokenizer):
    tokenizer.chat_template = None
    assert chat_prompt(tokenizer, [{"role": "user", "content": "Hello"}]) == "User: Hello\nAssistant:"


def test_a_conversation_without_a_system_message_gets_no_default_system_text(tokenizer):
    tokenizer.chat_template = DEFAULT_SYSTEM
    assert (
        chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}]) == "<|system|>\n<|user|>Hi\n<|assistant|>"
    )
    given = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(tokenizer, given) == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"


def test_a_template_without_a_system_role_gets_the_conversation_as_it_is(tokenizer):
    tokenizer.chat_template = NO_SYSTEM_ROLE
    assert chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}]) == "<|user|>Hi\n<|assistant|>"


def test_a_survey_question_is_the_served_chat_of_the_same_text_plus_the_answer_prefix(tokenizer):
    # An expert is trained on the very text a chat client's question is served with.
    tokenizer.chat_template = DEFAULT_SYSTEM
    text = question_text(tokenizer, "Is it good?", ["Yes", "No"])
    body = "Is it good?\nA. Yes\nB. No\nAnswer with the letter of one option."
    assert text == chat_prompt(tokenizer, [{"role": "user", "content": body}]) + "Answer:"
    assert "SmolLM" not in text
