"""Incremental detokenisation: pieces that never split a character and always add up to the whole text."""

import pytest

from workers.detokenize import INCOMPLETE, Detokenizer
from workers.tiny_model import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()  # byte-level BPE trained on ASCII: other characters are one token a byte


def stream(tokenizer, ids: list[int]) -> list[str]:
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    return [*pieces, detokenizer.finish()]


@pytest.mark.parametrize("text", ["Do you trust people?", "Grüße aus Köln", "日本語 😀 ok", "a 😀😀 b é"])
def test_pieces_concatenate_to_the_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert not any(INCOMPLETE in piece for piece in pieces)
    if any(ord(c) > 127 for c in text):
        assert len(ids) > len(text) and "" in pieces  # multi-byte characters were held back, then sent whole


def test_a_character_split_over_tokens_comes_out_whole(tokenizer):
    ids = tokenizer.encode("é😀", add_special_tokens=False)
    assert len(ids) == 6  # 2 + 4 bytes
    assert stream(tokenizer, ids) == ["", "é", "", "", "", "😀", ""]


def test_invalid_and_unfinished_bytes_decode_as_the_whole_does(tokenizer):
    # A stray continuation byte, then text, then the start of a 4-byte character that never finishes:
    # what a random model can pick. The pieces still add up to the decoded whole, U+FFFD included.
    stray = tokenizer.encode("é", add_special_tokens=False)[1]
    start = tokenizer.encode("😀", add_special_tokens=False)[:2]
    ids = [stray, *tokenizer.encode("ok", add_special_tokens=False), *start]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == f"{INCOMPLETE}ok{INCOMPLETE}"
    assert pieces[-1] == INCOMPLETE  # held back until the end, then given as the whole gives it


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("yes", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)) == "yes"
