"""Incremental detokenisation for streamed text: chunks that never split a character and add up to the
whole text.

Decoding each token alone breaks byte-level vocabularies: a character whose UTF-8 bytes span two tokens
comes out as two U+FFFD. `StreamText` decodes a short window of the request's ids instead (the ids since
the last emitted chunk plus the chunk before it, for decoders that look at their neighbours) and holds
text back while it ends in U+FFFD, i.e. while the last character may still be incomplete. At the end,
`finish()` decodes the whole output once and returns what was not sent yet, so the streamed chunks
always concatenate to exactly the final text (an incomplete character left at the end arrives as the
U+FFFD the final text has too). The cost per token is the decode of a few tokens, not of the whole output.
"""

from __future__ import annotations

import os

__all__ = ["StreamText"]

REPLACEMENT = "\ufffd"


class StreamText:
    """`push(ids) -> str` for each step's new ids, `finish() -> str` once at the end; `text` is then the
    decode of every id (equal to the concatenation of everything returned)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the chunk before the unsent ids, as context for the decoder
        self.read = 0  # ids[:read] have been sent as text
        self.sent: list[str] = []
        self.text: str | None = None

    def push(self, ids: list[int]) -> str:
        """The new text that the ids complete ("" while the last character may still be incomplete)."""
        self.ids.extend(ids)
        if not ids or self.read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith(REPLACEMENT) or not now.startswith(before):
            return ""  # nothing new yet, or an incomplete character at the end: wait for more ids
        self.prefix, self.read = self.read, len(self.ids)
        chunk = now[len(before):]
        self.sent.append(chunk)
        return chunk

    def finish(self) -> str:
        """The rest of the text: the whole output decoded once, less what was sent. (For a decoder whose
        text of a prefix is not always a prefix of the whole text, the rest starts where the two first
        differ, and `text` is what was streamed: the chunks still add up to it.)"""
        full = self.tokenizer.decode(self.ids)
        sent = "".join(self.sent)
        rest = full[len(sent):] if full.startswith(sent) else full[len(os.path.commonprefix([sent, full])):]
        self.sent.append(rest)
        self.text = sent + rest
        return rest
