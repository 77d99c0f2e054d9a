"""Serving benchmark: open-loop load at several request rates against the real server,
monolithic vs AFD topologies, in one run. `afd bench --scenario serve`.

Requests arrive as a Poisson process (fixed seed) whatever the server's speed (open loop),
stream their tokens, and record time to first token (TTFT) and time per output token after
the first (TPOT). Throughput is output tokens per second over the whole run of one rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from afd_compile.demo.tasks import held_out_set
from afd_compile.roles.rendezvous import free_port
from afd_compile.topology import Topology
from benchmarks.report import format_table, machine_info, panels, write_json


def engine_argv(args, deployment: str, max_model_len: int) -> list[str]:
    """The engine flags of a serving benchmark's ranks (`afd serve` / `afd launch` / `afd ffn`):
    one builder for every serving scenario. max_model_len: the scenario's default."""
    common = ["--model", str(args.model), "--max-num-seqs", str(args.max_num_seqs),
              "--max-model-len", str(args.max_model_len or max_model_len), "--dtype", args.dtype]
    # Compiled, the server warms up every decode shape before /health is ready (its default).
    common += ["--enforce-eager"] if args.enforce_eager else []
    if deployment == "monolithic":
        return common
    return [*common, "--afd-size", deployment, "--micro-batches", str(args.micro_batches), "--connector", args.connector]


def server_argv(args, deployment: str, port: int, max_model_len: int) -> list[str]:
    return ["serve" if deployment == "monolithic" else "launch", *engine_argv(args, deployment, max_model_len),
            "--port", str(port)]


def _start(deployment: str, args, port: int) -> subprocess.Popen:
    argv = server_argv(args, deployment, port, max_model_len=128)
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    return subprocess.Popen([sys.executable, "-m", "afd_compile.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 1800) -> None:
    """Up to 30 minutes: a compiled server compiles all its decode shapes first (minutes on CPU
    with a cold inductor cache)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    ok = resp.status_code == 200 and stamps
    return {"ok": bool(ok), "ttft": stamps[0] - start if ok else None, "tokens": len(stamps),
            "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if ok and len(stamps) > 1 else None,
            "end": time.perf_counter()}


async def _load(ports: list[int], rate: float, n: int, max_tokens: int, seed: int) -> dict:
    """n requests at `rate`, spread round-robin over the attention ranks' ports."""
    rng = random.Random(seed)
    prompts = [s.prompt for s in held_out_set(n, seed=seed)]
    urls = [f"http://127.0.0.1:{p}/v1/chat/completions" for p in ports]
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(_one(client, urls[i % len(urls)], prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    elapsed = max(r["end"] for r in results) - start
    ok = [r for r in results if r["ok"]]
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else None)  # noqa: E731
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"rate": rate, "requests": n, "errors": n - len(ok), "throughput_tok_s": sum(r["tokens"] for r in ok) / elapsed,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def run(args) -> dict:
    if args.workload:
        from benchmarks import serve_kv

        return serve_kv.run(args)
    if args.clients:
        from benchmarks import serve_closed_loop

        return serve_closed_loop.run(args)
    deployments = args.deployments.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    results = {}
    for deployment in deployments:
        port = free_port()
        num_attention = 1 if deployment == "monolithic" else Topology.parse(deployment).num_attention
        ports = [port + i for i in range(num_attention)]  # attention rank i serves port + i
        proc = _start(deployment, args, port)
        try:
            for p in ports:
                wait_healthy(p, proc)
            asyncio.run(_load(ports, rates[0], min(8, args.requests), args.max_tokens, seed=99))  # warm-up
            results[deployment] = [asyncio.run(_load(ports, r, args.requests, args.max_tokens, seed=i))
                                   for i, r in enumerate(rates)]
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
    rows = [[d, r["rate"], r["throughput_tok_s"], r["ttft_p50"] * 1e3, r["ttft_p99"] * 1e3,
             (r["tpot_p50"] or 0) * 1e3, (r["tpot_p99"] or 0) * 1e3, r["errors"]]
            for d, rs in results.items() for r in rs]
    print(format_table(["deployment", "req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                        "errors"], rows))
    result = {"scenario": "serve", "machine": machine_info(),
              "config": {"model": str(args.model), "requests_per_rate": args.requests, "max_tokens": args.max_tokens,
                         "micro_batches": args.micro_batches, "connector": args.connector,
                         "enforce_eager": args.enforce_eager},
              "results": results}
    out = write_json(result, "serve", args.out)
    plot = _plot(results, Path(out).with_suffix(".png"))
    print(f"wrote {out} and {plot}")
    return result


def _plot(results: dict, path: Path) -> Path:
    with panels(path, 2) as (a, b):
        for deployment, rs in results.items():
            rates = [r["rate"] for r in rs]
            a.plot(rates, [r["throughput_tok_s"] for r in rs], marker="o", label=deployment)
            b.plot(rates, [r["ttft_p50"] * 1e3 for r in rs], marker="o", label=f"{deployment} p50")
            b.plot(rates, [r["ttft_p99"] * 1e3 for r in rs], marker="x", linestyle="--", label=f"{deployment} p99")
        a.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="throughput")
        b.set(xlabel="request rate (req/s)", ylabel="ms", title="time to first token")
    return path
