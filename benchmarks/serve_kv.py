"""KV cache workloads of `afd bench --scenario serve --workload NAME`, each against real servers
(monolithic, `afd serve`) started twice in one run: once per setting compared.

- shared-prefix: requests sharing a long system prompt (token ids) with short questions, TTFT
  with prefix caching against without (the same requests, the same Poisson arrivals).
- mixed: prompts and outputs of mixed lengths at a fixed KV memory budget (that of
  `--max-num-seqs` static slots of max_model_len), the paged cache admitting up to 4x the
  sequences against a batch capped at that many slots; throughput, the most sequences running at
  once, and the KV cache usage sampled over time.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from afd_compile.roles.rendezvous import free_port
from benchmarks.report import format_table, machine_info, panels, write_json
from benchmarks.serve import wait_healthy

SAMPLE_S = 0.2  # /metrics polling period of the usage-over-time series


def _max_model_len(args) -> int:
    """--max-model-len, else the engine's default for the model."""
    from afd_compile.config import EngineConfig
    from afd_compile.model.loader import load_config

    return EngineConfig(max_model_len=args.max_model_len).resolve_max_model_len(load_config(args.model))


def _start(args, port: int, extra: list[str]) -> subprocess.Popen:
    argv = ["serve", "--model", str(args.model), "--max-model-len", str(_max_model_len(args)), "--dtype", args.dtype,
            "--port", str(port), *(["--enforce-eager"] if args.enforce_eager else []), *extra]
    return subprocess.Popen([sys.executable, "-m", "afd_compile.cli", *argv], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                first, tokens = first or time.perf_counter(), tokens + 1
    return {"ok": resp.status_code == 200 and first is not None, "ttft": (first or start) - start, "tokens": tokens}


async def _metric(client: httpx.AsyncClient, base: str, names: tuple[str, ...]) -> dict[str, float]:
    text = (await client.get(f"{base}/metrics")).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.split() and line.split()[0] in names}


async def _run_load(port: int, requests: list[tuple[list[int], int]], rate: float | None, seed: int) -> dict:
    """requests (prompt ids, max_tokens), Poisson arrivals at `rate` (None: all at once); samples
    the running requests and KV cache usage every SAMPLE_S."""
    base, rng = f"http://127.0.0.1:{port}", random.Random(seed)
    names = ("afd:num_requests_running", "afd:kv_cache_usage_perc", "afd:num_preemptions_total",
             "afd:prefix_cache_hits_total")
    samples, done = [], asyncio.Event()
    async with httpx.AsyncClient(timeout=1800) as client:
        start = time.perf_counter()

        async def sample():
            while not done.is_set():
                samples.append({"t": time.perf_counter() - start, **await _metric(client, base, names)})
                await asyncio.sleep(SAMPLE_S)

        sampler = asyncio.create_task(sample())
        tasks = []
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(_one(client, f"{base}/v1/completions", prompt, max_tokens)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        done.set()
        await sampler
        final = await _metric(client, base, names)
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok), "elapsed_s": elapsed,
            "throughput_tok_s": sum(r["tokens"] for r in ok) / elapsed,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "max_running": max(s.get("afd:num_requests_running", 0) for s in samples),
            "preemptions": final.get("afd:num_preemptions_total", 0.0),
            "prefix_cache_hits": final.get("afd:prefix_cache_hits_total", 0.0), "samples": samples}


def _serve_and_load(args, extra: list[str], requests, rate, seed) -> dict:
    port = free_port()
    proc = _start(args, port, extra)
    try:
        wait_healthy(port, proc)
        asyncio.run(_run_load(port, requests[:4], None, seed + 1))  # warm-up: connections, first prefills
        return asyncio.run(_run_load(port, requests, rate, seed))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


def _vocab(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(7, 1000) for _ in range(n)]  # clear of the demo tokenizer's special ids


def shared_prefix(args) -> dict:
    rng = random.Random(0)
    system = _vocab(rng, 384)
    requests = [(system + _vocab(rng, 16), args.max_tokens) for _ in range(64)]
    # The warm-up's requests share the system prompt too: its blocks are cached before the measured
    # round in the run with prefix caching, as on a server that has served it before.
    runs = {name: _serve_and_load(args, extra, requests, args.rate, seed=1)
            for name, extra in (("prefix caching", []), ("no prefix caching", ["--no-enable-prefix-caching"]))}
    ratio = runs["no prefix caching"]["ttft_p50_s"] / runs["prefix caching"]["ttft_p50_s"]
    return {"runs": runs, "ttft_p50_ratio": ratio}


def mixed(args) -> dict:
    from afd_compile.model.loader import load_config

    hf = load_config(args.model)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    per_position = hf.num_hidden_layers * (hf.kv_lora_rank + hf.qk_rope_head_dim) * dtype_bytes
    budget = args.max_num_seqs * _max_model_len(args) * per_position  # that many static slots of max_model_len
    rng = random.Random(0)
    # 8x the static slots: enough that the paged cache, not the request count, bounds the batch
    requests = [(_vocab(rng, rng.randint(16, 256)), rng.randint(16, 128)) for _ in range(8 * args.max_num_seqs)]
    kv = ["--kv-cache-memory-bytes", str(budget)]
    runs = {name: _serve_and_load(args, [*kv, "--max-num-seqs", str(seqs), "--no-enable-prefix-caching"], requests,
                                  None, seed=1)
            for name, seqs in (("static-equivalent", args.max_num_seqs), ("paged", 4 * args.max_num_seqs))}
    return {"kv_cache_memory_bytes": budget, "runs": runs,
            "running_ratio": runs["paged"]["max_running"] / runs["static-equivalent"]["max_running"],
            "throughput_ratio": runs["paged"]["throughput_tok_s"] / runs["static-equivalent"]["throughput_tok_s"]}


def run(args) -> dict:
    workload = {"shared-prefix": shared_prefix, "mixed": mixed}[args.workload]
    result = workload(args)
    rows = [[name, r["requests"], r["errors"], r["throughput_tok_s"], r["ttft_p50_s"] * 1e3, r["ttft_p99_s"] * 1e3,
             r["max_running"], r["preemptions"], r["prefix_cache_hits"]] for name, r in result["runs"].items()]
    print(format_table(["run", "requests", "errors", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "max running",
                        "preemptions", "prefix hits"], rows))
    print({k: v for k, v in result.items() if k != "runs"})
    out = write_json({"scenario": "serve", "workload": args.workload, "machine": machine_info(),
                      "config": {"model": str(args.model), "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
                                 "max_tokens": args.max_tokens, "rate": args.rate, "max_model_len": _max_model_len(args),
                                 "enforce_eager": args.enforce_eager}, **result}, f"serve_{args.workload}", args.out)
    plot = _plot(result["runs"], Path(out).with_suffix(".png"))
    print(f"wrote {out} and {plot}")
    return result


def _plot(runs: dict, path: Path) -> Path:
    with panels(path, 2) as (a, b):
        for name, r in runs.items():
            t = [s["t"] for s in r["samples"]]
            a.plot(t, [100 * s.get("afd:kv_cache_usage_perc", 0) for s in r["samples"]], label=name)
            b.plot(t, [s.get("afd:num_requests_running", 0) for s in r["samples"]], label=name)
        a.set(xlabel="s", ylabel="% of KV blocks held", title="KV cache usage")
        b.set(xlabel="s", ylabel="requests", title="running")
    return path
