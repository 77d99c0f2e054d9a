"""Per-request sampling parameters, with the names and defaults of vLLM's SamplingParams."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from afd_compile.errors import AfdError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token; 0 = only the chosen one

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_types()
        self._check(self.temperature >= 0, "temperature", "must be >= 0")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.top_k >= -1, "top_k", "must be -1 (disabled), 0 (disabled) or positive")
        self._check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        self._check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        self._check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        self._check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        # torch.Generator.manual_seed takes [-2**63, 2**64); out of it, it raises in the engine loop.
        self._check(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "must be in [-2**63, 2**64)")
        self._check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        self._check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")

    def _check_types(self) -> None:
        """Wrong types (a string temperature, a float max_tokens, a bool top_k) are the caller's
        error, named like any bad value, not a TypeError from a comparison below."""
        for f in fields(self):
            value, (kinds, what) = getattr(self, f.name), _TYPES[f.name]
            ok = _is(value, kinds)
            if ok and isinstance(value, list):
                ok = all(_is(v, (str,) if f.name == "stop" else (int,)) for v in value)
            if not ok:
                raise AfdError(f"{f.name}={value!r} is invalid: must be {what}")

    def _check(self, ok: bool, name: str, rule: str) -> None:
        value = getattr(self, name)
        if isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise AfdError(f"{name}={value!r} is invalid: {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _is(value, kinds: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not a number here (True is an int to Python)."""
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


_NUMBER = ((float, int), "a number")
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": _NUMBER, "top_p": _NUMBER, "top_k": ((int,), "an integer"), "min_p": _NUMBER,
    "repetition_penalty": _NUMBER, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "seed": ((int, type(None)), "an integer or None"), "max_tokens": ((int,), "an integer"),
    "stop": ((list,), "a list of strings"), "stop_token_ids": ((list,), "a list of integers"),
    "ignore_eos": ((bool,), "a bool"), "logprobs": ((int, type(None)), "an integer or None"),
}
