"""Incremental detokenisation: pieces that never split a character and always add up to the whole text."""

import pytest

from workers.detokenize import INCOMPLETE, Detokenizer, StopStrings, token_text
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


# ---------------------------------------------------------------------------------------------------------
# Stop strings: the text ends before the first, and no piece ever reaches into one
# ---------------------------------------------------------------------------------------------------------


def cut(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    stop = StopStrings(stops)
    released = [stop.feed(p) for p in pieces]
    return [*released, stop.finish()], stop.stopped


@pytest.mark.parametrize(
    ("pieces", "text"),
    [
        (["Hello", " world", "\n\nQ:", " next"], "Hello world"),  # the stop in one piece
        (["Hello world\n", "\nQ", ": next"], "Hello world"),  # split over three
        (["Hello world\n\n", "Q", ":"], "Hello world"),
        (["H", "e", "l", "l", "o", " ", "w", "o", "r", "l", "d", "\n", "\n", "Q", ":", "x"], "Hello world"),
    ],
)
def test_text_ends_before_a_stop_string_however_the_pieces_split_it(pieces, text):
    released, stopped = cut(["\n\nQ:"], pieces)
    assert stopped and "".join(released) == text
    sent = ""
    for piece in released:  # no prefix of the stream ever holds text from the stop string on
        sent += piece
        assert text.startswith(sent)


def test_held_text_that_turns_out_no_stop_string_is_sent_after_all():
    released, stopped = cut(["END"], ["The E", "N", "D", "ing is near"])
    assert stopped and "".join(released) == "The "
    released, stopped = cut(["END"], ["The E", "Nd", " is near"])
    assert not stopped and released == ["The ", "ENd", " is near", ""]  # "E" held while it could be "END"
    released, stopped = cut(["END"], ["The EN"])
    assert not stopped and released == ["The ", "EN"]  # the end of the text: what was held is sent


def test_the_earliest_of_several_stop_strings_cuts():
    released, stopped = cut(["world", "lo w"], ["Hello", " world"])
    assert stopped and "".join(released) == "Hel"
    assert cut([], ["a", "b"]) == (["a", "b", ""], False)  # no stop strings: everything passes at once


def test_a_token_text_and_bytes_as_openai_shows_them(tokenizer):
    ids = tokenizer.encode("a é 😀 Answer", add_special_tokens=False)
    texts = [token_text(tokenizer, i) for i in ids]
    assert bytes(b for _, raw in texts for b in raw).decode() == "a é 😀 Answer"  # exact bytes, joined
    assert INCOMPLETE in texts[2][0] and len(texts[2][1]) == 1  # half a character: its own byte
    assert token_text(tokenizer, tokenizer.eos_token_id) == ("<eos>", list(b"<eos>"))
