"""Prometheus metrics (names follow vLLM's `vllm:` set, under `afd:`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from torch._dynamo.utils import counters

from afd_compile.compilation import Compiling

log = logging.getLogger("afd.engine")
STATS_INTERVAL_S = 10.0  # vLLM's LoggingStatLogger logs every 10 s too
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("afd:requests", "Requests admitted to the engine", registry=r)
        self.finished_requests = Counter("afd:requests_finished", "Finished requests by finish reason",
                                         ["finish_reason"], registry=r)
        for reason in ("stop", "length", "abort"):  # exported from the start, at 0
            self.finished_requests.labels(reason)
        self.generation_tokens = Counter("afd:generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("afd:prompt_tokens", "Prompt tokens processed", registry=r)
        self.ttft = Histogram("afd:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("afd:time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("afd:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("afd:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("afd:num_requests_waiting", "Requests waiting for KV cache blocks", registry=r)
        self.kv_cache_usage = Gauge("afd:kv_cache_usage_perc", "Fraction of KV cache blocks held by requests (0-1)",
                                    registry=r)
        self.prefix_cache_queries = Counter("afd:prefix_cache_queries", "Tokens looked up in the prefix cache",
                                            registry=r)
        self.prefix_cache_hits = Counter("afd:prefix_cache_hits", "Tokens found in the prefix cache", registry=r)
        self.num_preemptions = Counter("afd:num_preemptions", "Requests preempted for lack of KV blocks", registry=r)
        self._counted = (0, 0, 0)  # the engine's queries, hits, preemptions already counted
        self.connector_latency = Histogram("afd:connector_wait_seconds",
                                           "Attention rank's wait for FFN output, per layer", ["layer"],
                                           buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1), registry=r)
        # Read at scrape time from dynamo's own count: one that grows after /health turned ready
        # is a request that waited for a compile.
        self.compiled_graphs = Gauge("afd:compiled_graphs", "Graphs torch.compile built in the engine's process",
                                     registry=r)
        self.compiled_graphs.set_function(lambda: counters["stats"]["unique_graphs"])
        self.compiles_running = Gauge("afd:compiles_running", "Decode shapes compiling in the engine's process now",
                                      registry=r)
        self.compiles_running.set_function(lambda: Compiling.running)

    def watch_kv_cache(self, usage: Callable[[], float]) -> None:
        """Reads the KV cache use at scrape time: a leaked block shows here even while the engine is idle."""
        self.kv_cache_usage.set_function(usage)

    def set_scheduler(self, scheduler) -> None:
        """The queues, and what the prefix cache and preemption counted since the last call."""
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        blocks = scheduler.block_manager
        now = (blocks.queries, blocks.hits, scheduler.num_preemptions)
        for counter, new, old in zip((self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions), now,
                                     self._counted):
            if new > old:
                counter.inc(new - old)
        self._counted = now

    def finished(self, seq, e2e_s: float, since_first_token_s: float) -> None:
        self.finished_requests.labels(seq.finish_reason).inc()
        self.prompt_tokens.inc(len(seq.prompt_token_ids))
        self.e2e.observe(e2e_s)
        if len(seq.output_token_ids) > 1:
            self.tpot.observe(since_first_token_s / (len(seq.output_token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatLogger:
    """vLLM's periodic INFO line while the engine is busy: prompt and generation throughput since
    the last line, running and waiting requests, KV cache use. Silent while idle."""

    def __init__(self, interval_s: float = STATS_INTERVAL_S):
        self.interval_s = interval_s
        self.last = time.monotonic()
        self.prompt_tokens = self.generation_tokens = 0

    def step(self, running: int, waiting: int, kv_usage: float, prefix_hit_rate: float) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        if self.prompt_tokens or self.generation_tokens or running or waiting:
            span = now - self.last
            log.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                     "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                     self.prompt_tokens / span, self.generation_tokens / span, running, waiting, 100 * kv_usage,
                     100 * prefix_hit_rate)
        self.last, self.prompt_tokens, self.generation_tokens = now, 0, 0
