"""Incremental detokenization, as vLLM does it: each new token's text is the difference between
decoding a short window of recent tokens with and without it, so an update costs O(new tokens)
where decoding the whole output every time costs O(length). A token that ends inside a
multi-byte character (decoded as U+FFFD) waits for the next one.

A sequence decodes on demand (Sequence.output_text), not in the engine step: offline runs
decode once at the end, and a server decodes in its API process (serve/engine_client.py), as
vLLM detokenizes outside its engine core. Only requests with stop strings decode in the step,
to find them; both sides cut the text at them with cut_at_stop."""

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


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the first of the stop strings in it (each cut in turn, as vLLM), and whether
    any was found."""
    found = False
    for stop in stops:
        cut = text.find(stop)
        if cut != -1:
            text, found = text[:cut], True
    return text, found


def visible_text(text: str, stops: list[str], finished: bool) -> str:
    """What of a request's text may be streamed: all once finished; before, not the tail that
    may still become a stop string."""
    if finished or not stops:
        return text
    return text[: max(0, len(text) - max(map(len, stops)) + 1)]
