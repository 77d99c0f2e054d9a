"""How every peer backend is timed (`afd bench --scenario peers`); standard library only, since
benchmarks/peer_vllm.py imports it inside vLLM's own venv, where afd-compile is not installed."""

from __future__ import annotations

import time

RESULT_PREFIX = "PEER_RESULT "  # the one stdout line a peer process reports its results on


def measure(generate, prompts: list[list[int]], short: int, long: int, repeats: int) -> dict:
    """Times generate(prompts, n) -> token ids per prompt for n = 1, short, long (best of
    `repeats`, after a warm-up run of `long`), and keeps the `long` run's tokens."""
    generate(prompts, long)  # compiles / allocates whatever this batch needs
    times = {}
    for n in (1, short, long):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(prompts, n)
            best = min(best, time.perf_counter() - t0)
        times[str(n)] = best
    return {"batch_size": len(prompts), "times": times, "outputs": generate(prompts, long)}
