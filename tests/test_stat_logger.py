"""The busy engine's periodic INFO line (vLLM's LoggingStatLogger): throughput since the last
line, running and waiting requests, KV cache use; silent while idle."""

from __future__ import annotations

import re
import time

from afd_compile.serve.metrics import StatLogger


def test_a_line_every_interval_while_busy_and_none_while_idle(caplog):
    stats = StatLogger(interval_s=0.05)
    with caplog.at_level("INFO", logger="afd.engine"):
        stats.step(running=2, waiting=1, kv_usage=0.375, prefix_hit_rate=0.5)  # within the first interval: nothing yet
        stats.prompt_tokens, stats.generation_tokens = 24, 100
        time.sleep(0.06)
        stats.step(running=2, waiting=1, kv_usage=0.375, prefix_hit_rate=0.5)
        time.sleep(0.06)
        stats.step(running=0, waiting=0, kv_usage=0.0, prefix_hit_rate=0.5)  # idle for a whole interval: silent
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    match = re.fullmatch(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                         r"Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 37.5%, Prefix cache hit rate: 50.0%", lines[0])
    assert match, lines[0]
    prompt, generation = map(float, match.groups())
    assert 100 < prompt < 24 / 0.05 and 500 < generation < 100 / 0.05  # per second of the interval
