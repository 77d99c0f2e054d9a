"""Load: many concurrent streaming clients on loopback for a fixed time, against a real
`afd serve` (the shipped model, eager), and what must hold once they stop:

  - zero errors: every request answered 200 and its stream ended with [DONE], no error chunk
    (one request in ten hangs up after its first chunk instead, to exercise the abort path);
  - every KV cache block free again (afd:kv_cache_usage_perc == 0), nothing
    running or waiting;
  - the server's RSS back within 10% of its level before the load (measured after a warm-up,
    so that one-time allocations of the first batches are not counted as growth).

Both are slow (`pytest -m slow`): a short run (50 clients for 10 s) and the full soak (200
clients for 60 s), which writes its figures to the benchmark runs folder
(benchmarks.report.RUNS_DIR). Both print their throughput.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from benchmarks.report import machine_info, write_json
from tests.server_fixtures import Deployment, sse_chunks, start_monolithic

RSS_TOLERANCE = 0.10
REQUEST_TIMEOUT_S = 120  # a request waits for KV blocks behind up to (clients / slots) others


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Tally:
    requests: int = 0
    abandoned: int = 0  # hung up after the first chunk, on purpose
    completion_tokens: int = 0
    chunks: int = 0
    errors: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)


def request_body(rng: random.Random) -> dict:
    start = rng.randrange(1, 40, 2)
    prompt = " ".join(str(start + 2 * i) for i in range(rng.randint(2, 6)))
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(4, 24),
            "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5, "stream": True,
            "stream_options": {"include_usage": True}}


async def one_stream(client: httpx.AsyncClient, body: dict, tally: Tally, abandon: bool) -> None:
    t0, first, done, usage = time.monotonic(), None, False, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            tally.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for chunk in sse_chunks(r):
            if chunk is None:
                done = True
                continue
            if "error" in chunk:
                tally.errors.append(f"error chunk: {chunk['error']}")
                return
            first = first or time.monotonic()
            tally.chunks += 1
            if abandon:  # leaving the block closes the connection: the server must free the blocks
                tally.abandoned += 1
                return
            usage = chunk.get("usage") or usage
    if not done or usage is None:
        tally.errors.append(f"stream ended without [DONE] or usage (done={done})")
        return
    tally.requests += 1
    tally.completion_tokens += usage["completion_tokens"]
    tally.ttft_s.append(first - t0)


async def client_loop(url: str, seed: int, until: float, tally: Tally) -> None:
    """One client: a request, then the next as soon as it ends, until `until` (monotonic)."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        while time.monotonic() < until:
            try:
                await one_stream(client, request_body(rng), tally, abandon=rng.random() < 0.1)
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                tally.errors.append(f"{type(e).__name__}: {e}")


def run_load(d: Deployment, clients: int, duration_s: float) -> dict:
    async def go():
        tally = Tally()
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(client_loop(d.url, i, t0 + duration_s, tally)
                                                for i in range(clients))),
                               timeout=duration_s + 2 * REQUEST_TIMEOUT_S)
        return tally, time.monotonic() - t0

    tally, wall_s = asyncio.run(go())
    ttft = sorted(tally.ttft_s) or [float("nan")]
    return {"clients": clients, "duration_s": duration_s, "wall_s": round(wall_s, 2), "requests": tally.requests,
            "abandoned": tally.abandoned,
            "errors": len(tally.errors), "first_errors": tally.errors[:5],
            "completion_tokens": tally.completion_tokens, "throughput_tok_s": round(tally.completion_tokens / wall_s, 1),
            "requests_per_s": round(tally.requests / wall_s, 2), "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))], 3)}


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} after {timeout_s} s"
        time.sleep(0.2)


def soak(shipped_model, log_dir, clients: int, duration_s: float) -> dict:
    d = start_monolithic(shipped_model, log_dir, f"soak-{clients}")
    try:
        d.wait_ready()
        pid = d.server.pid
        warm = run_load(d, clients=16, duration_s=3)  # first batches allocate once: not growth
        assert warm["errors"] == 0, warm
        rss_before = rss_bytes(pid)
        result = run_load(d, clients, duration_s)
        wait_until(lambda: d.metric("afd:num_requests_running") == 0 and d.metric("afd:num_requests_waiting") == 0,
                   30, "requests still running or waiting")
        kv_usage = d.metric("afd:kv_cache_usage_perc")
        # glibc may hand freed pages back a moment later; give RSS a few seconds to settle.
        limit = rss_before * (1 + RSS_TOLERANCE)
        settle = time.monotonic() + 10
        while (rss_after := rss_bytes(pid)) > limit and time.monotonic() < settle:
            time.sleep(0.5)
        healthy = httpx.get(f"{d.url}/health", timeout=10).status_code
    finally:
        d.stop()
    result.update(kv_cache_usage_after=kv_usage, rss_before_mib=rss_before >> 20,
                  rss_after_mib=rss_after >> 20, rss_change=round(rss_after / rss_before - 1, 4), health_after=healthy)
    print(f"\nsoak: {clients} streaming clients x {duration_s:.0f} s: {result['requests']} requests "
          f"(+{result['abandoned']} abandoned), {result['errors']} errors, {result['throughput_tok_s']} tok/s, {result['requests_per_s']} req/s, "
          f"TTFT p50 {result['ttft_p50_s']} s p99 {result['ttft_p99_s']} s; KV cache usage after {kv_usage:.0%}; "
          f"RSS {rss_before >> 20} -> {rss_after >> 20} MiB ({result['rss_change']:+.1%})")
    assert result["errors"] == 0, result["first_errors"]
    assert result["requests"] >= clients, result  # every client got at least one request through
    assert kv_usage == 0, kv_usage
    assert rss_after <= limit, f"RSS {rss_before >> 20} MiB before, {rss_after >> 20} MiB after the load"
    assert healthy == 200
    return result


@pytest.mark.slow  # 33 s; the chaos and 200-client soaks are slow too
@pytest.mark.timeout(600)
def test_soak_50_streaming_clients_10s(shipped_model, tmp_path):
    """Oracle: the invariants of the module docstring, in a short run for the default suite."""
    soak(shipped_model, tmp_path, clients=50, duration_s=10)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_200_streaming_clients_60s(shipped_model, tmp_path):
    """Oracle: the same invariants with 200 clients for 60 s; the figures go to RUNS_DIR/soak.json
    (outside the checkout)."""
    result = soak(shipped_model, tmp_path, clients=200, duration_s=60)
    path = write_json({"scenario": "soak", "machine": machine_info(),
                       "config": {"model": str(shipped_model), "backend": "monolithic", "enforce_eager": True,
                                  "transport": "loopback http, SSE", "clients": 200, "duration_s": 60},
                       "results": result}, "soak")
    print(f"wrote {path}")
