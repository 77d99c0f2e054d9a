"""Incremental detokenization, as vLLM does it: each new token's text is the difference between
decoding a short window of recent tokens with and without it, so an update costs O(new tokens)
where decoding the whole output every time costs O(length). A token that ends inside a
multi-byte character (decoded as U+FFFD) waits for the next one.

A sequence decodes on demand (Sequence.output_text), not in the engine step: offline runs
decode once at the end and a server once per streamed delta (vLLM likewise detokenizes outside
its engine core). Only requests with stop strings decode in the step, to find them."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.offsets = (0, 0)  # token ids: decoding window start, first not yet in self.text

    def update(self, ids: list[int]) -> str:
        """Appends the text of ids[offsets[1]:] to self.text; returns what was added."""
        start, read = self.offsets
        if read == len(ids):
            return ""
        prefix = self.tokenizer.decode(ids[start:read], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        new = text[len(prefix):]
        self.text += new
        self.offsets = (read, len(ids))
        return new
