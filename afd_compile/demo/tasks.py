"""Synthetic number-sequence tasks the shipped demo model is trained on.

A user message is the first few terms of a sequence ("1 3 5 7 9"); the assistant answers with
the next `CONTINUATION` terms ("11 13 15 17 19 21 23 25"), stopping early where the sequence
would leave 0..MAX_NUMBER. As raw text, a sequence goes on to RAW_TERMS terms (or until it
leaves the range). Every number is one token, so the model learns successor arithmetic over its
embeddings.

Held-out sequences are (start, step) pairs that training never sees; the accuracy test draws
from them, so passing it means the model generalises rather than memorises.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_NUMBER = 999
CONTINUATION = 8
MIN_SHOWN, MAX_SHOWN = 3, 8
MAX_STEP = 20
RAW_TERMS = 36  # a raw-text sequence in training: "2 4 6" and `afd generate`'s 32 tokens after it


@dataclass(frozen=True)
class NumberSequence:
    start: int
    step: int
    shown: int

    def terms(self) -> list[int]:
        out = []
        for i in range(self.shown + CONTINUATION):
            value = self.start + i * self.step
            if not 0 <= value <= MAX_NUMBER:
                break
            out.append(value)
        return out

    def raw_terms(self) -> list[int]:
        """The sequence as raw text: up to RAW_TERMS terms, ending early where it leaves the range."""
        values = (self.start + i * self.step for i in range(RAW_TERMS))
        out = []
        for value in values:
            if not 0 <= value <= MAX_NUMBER:
                break
            out.append(value)
        return out

    @property
    def prompt(self) -> str:
        return " ".join(map(str, self.terms()[: self.shown]))

    @property
    def answer(self) -> str:
        return " ".join(map(str, self.terms()[self.shown :]))


def is_held_out(start: int, step: int) -> bool:
    return (start * 31 + step * 17) % 23 == 0


def _draw(rng: random.Random) -> NumberSequence:
    shown = rng.randint(MIN_SHOWN, MAX_SHOWN)
    kind = rng.random()
    if kind < 0.15:  # counting up or down by one
        step = rng.choice((1, -1))
    elif kind < 0.3:  # multiples of k: k, 2k, 3k, ...
        step = rng.randint(2, MAX_STEP)
        return NumberSequence(step * rng.randint(1, 4), step, shown)
    else:  # arithmetic, up or down
        step = rng.randint(1, MAX_STEP) * rng.choice((1, -1))
    lo = 0 if step > 0 else -step * (shown - 1)
    hi = MAX_NUMBER - step * (shown - 1) if step > 0 else MAX_NUMBER
    return NumberSequence(rng.randint(lo, hi), step, shown)


def sample(rng: random.Random, held_out: bool) -> NumberSequence:
    """One sequence from the training split (held_out=False) or the held-out split."""
    while True:
        seq = _draw(rng)
        if is_held_out(seq.start, seq.step) == held_out and len(seq.terms()) > seq.shown:
            return seq


def held_out_set(n: int = 200, seed: int = 1234) -> list[NumberSequence]:
    rng = random.Random(seed)
    return [sample(rng, held_out=True) for _ in range(n)]
