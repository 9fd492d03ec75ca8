"""Incremental detokenisation: the text of a stream of token ids, piece by piece, as it grows, cut at stop strings.

A token is not a piece of text: a byte-level token may hold half of a UTF-8 character, and some tokenizers
merge or drop spaces depending on the neighbours. So each piece is the difference between decoding a short
window of the recent tokens with and without the new ones (as text-generation-inference does); while that
difference ends in an incomplete character (U+FFFD) it is held back until a later token completes it.
`finish()` gives what is held back, so that the pieces always concatenate to the decoded whole.

`StopStrings` cuts such a stream of pieces before the first stop string (OpenAI's `stop`), holding back any
text that may be the start of one, so a stream never sends text that a stop string later takes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what decoding gives for the bytes of a character not yet complete


class Detokenizer:
    """Turns token ids, one at a time, into text pieces whose concatenation is the decoded text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0  # the window starts here: enough context for spaces and merges
        self._read = 0  # the tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The new text that `token` completes ("" while it completes no character)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.emitted += piece
        return piece

    def finish(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD, as in the whole)."""
        whole = self._decode(self.ids)
        if whole.startswith(self.emitted):
            rest = whole[len(self.emitted) :]
        else:  # a tokenizer whose windowed decoding disagrees with the whole: never take back what was sent
            before = self._decode(self.ids[self._prefix : self._read])
            rest = self._decode(self.ids[self._prefix :])[len(before) :]
        self.emitted += rest
        return rest


class StopStrings:
    """Cuts a stream of text pieces before the first of its stop strings; `stopped` once one is met.

    A piece's text is sent at once unless its end may begin a stop string: that tail is held back until the
    next pieces show whether it does, so the text released never reaches into a stop string.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text not released yet: the longest tail that begins some stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that `piece` releases ("" once stopped)."""
        if self.stopped:
            return ""
        text = self.held + piece
        found = [at for at in (text.find(s) for s in self.stops) if at >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)]
        keep = self._open_tail(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> str:
        """What is still held back at the end of the text (no stop string followed it)."""
        rest, self.held = self.held, ""
        return rest

    def _open_tail(self, text: str) -> int:
        """The length of the longest end of `text` that is the start (not the whole) of a stop string."""
        for length in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0


def token_text(tokenizer: PreTrainedTokenizerBase, token: int) -> tuple[str, list[int]]:
    """A token's text on its own and its UTF-8 bytes (as OpenAI's logprobs show a token).

    A byte-level token may hold part of a character: its text then shows U+FFFD, and its bytes are the exact
    ones, which concatenated with its neighbours' give the text.
    """
    text = tokenizer.decode([token], skip_special_tokens=False)
    piece = tokenizer.convert_ids_to_tokens(token)
    exact = _byte_level_bytes(piece) if _is_byte_level(tokenizer) else _byte_fallback(piece)
    return text, list(exact if exact is not None else text.encode("utf-8"))


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the others for 256 + n."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + len(chars) - len(printable))
    return {char: byte for byte, char in chars.items()}


def _byte_level_bytes(piece: str | None) -> bytes | None:
    """The bytes a byte-level BPE token stands for (GPT-2's alphabet: one character per byte), if it is one."""
    decoder = _byte_decoder()
    if not piece or any(c not in decoder for c in piece):
        return None  # a special token, written in plain text
    return bytes(decoder[c] for c in piece)


def _byte_fallback(piece: str | None) -> bytes | None:
    """The byte a SentencePiece byte-fallback token (`<0xE2>`) stands for, if it is one."""
    if piece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    return None
