"""Incremental detokenisation: the text of a stream of token ids, piece by piece, as it grows.

A token is not a piece of text: a byte-level token may hold half of a UTF-8 character, and some tokenizers
merge or drop spaces depending on the neighbours. So each piece is the difference between decoding a short
window of the recent tokens with and without the new ones (as text-generation-inference does); while that
difference ends in an incomplete character (U+FFFD) it is held back until a later token completes it.
`finish()` gives what is held back, so that the pieces always concatenate to the decoded whole.
"""

from __future__ import annotations

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
