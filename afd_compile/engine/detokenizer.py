"""Incremental detokenization, as vLLM does it: each new token's text is the difference between
decoding a short window of recent tokens with and without it, so a step costs O(1) in the
output length where decoding the whole output every step costs O(length). A token that ends
inside a multi-byte character (decoded as U+FFFD) waits for the next one."""

from __future__ import annotations

from afd_compile.engine.sequence import Sequence


def detokenize_incrementally(tokenizer, seq: Sequence) -> str:
    """Appends the text of seq's newest token(s) to seq.output_text; returns what was added."""
    ids = seq.output_token_ids
    start, read = seq.detok_offsets
    prefix = tokenizer.decode(ids[start:read], skip_special_tokens=True)
    text = tokenizer.decode(ids[start:], skip_special_tokens=True)
    if len(text) <= len(prefix) or text.endswith("\ufffd"):
        return ""
    new = text[len(prefix):]
    seq.output_text += new
    seq.detok_offsets = (read, len(ids))
    return new
