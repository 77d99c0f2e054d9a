"""Closed-loop serving against the offline engine, in one run: `afd bench --scenario serve
--clients 16,32`.

B clients each send a request (a fixed prompt, --max-tokens tokens, ignore_eos) and the next
when all B have ended: a round is B requests served together. For each deployment (monolithic,
xAyF), the server starts as a user starts it (`afd serve` / `afd launch`: its own warm-up and
compile cache, nothing compiled by this benchmark), serves --rounds rounds at each B, and is
stopped; then the offline engine runs the same rounds (LLMEngine.generate of B copies of the
prompt; for xAyF its attention rank's engine with FFN ranks started by `afd ffn`). Served /
offline tok/s is the cost of serving; the slowest round against the median shows stalls (a
compile inside a request would be one). Processes run one at a time: the 2 cores are shared.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import httpx

from afd_compile.errors import AfdError
from afd_compile.roles.rendezvous import free_port
from afd_compile.roles.store import SECRET_ENV, new_secret
from afd_compile.topology import Topology
from benchmarks.report import format_table, machine_info, write_json
from benchmarks.serve import engine_argv, server_argv, wait_healthy

PROMPT = "1 3 5 7 9 11 13 15 17 19 21 23"


MAX_MODEL_LEN = 256  # without --max-model-len: the servers and the offline engine alike


def _served(args, deployment: str, clients: list[int]) -> dict:
    port = free_port()
    argv = server_argv(args, deployment, port, MAX_MODEL_LEN)
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "afd_compile.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        num_attention = 1 if deployment == "monolithic" else Topology.parse(deployment).num_attention
        urls = [f"http://127.0.0.1:{port + i}" for i in range(num_attention)]
        for i in range(num_attention):
            wait_healthy(port + i, proc)
        startup_s = time.monotonic() - start
        rounds = {b: asyncio.run(_rounds(urls, b, args.rounds, args.max_tokens)) for b in clients}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
    return {"startup_s": startup_s, "rounds": rounds}


async def _rounds(urls: list[str], clients: int, rounds: int, max_tokens: int) -> list[float]:
    """tok/s of each round: B streaming completions at once (spread over the attention ranks)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(url: str) -> int:
            tokens = 0  # from the usage chunk: a chunk may carry several tokens
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith('data: {"') and '"usage"' in line:
                        tokens = json.loads(line[6:]).get("usage", {}).get("completion_tokens", tokens)
            if resp.status_code != 200 or tokens < max_tokens:
                raise RuntimeError(f"a request failed ({resp.status_code}, {tokens} of {max_tokens} tokens)")
            return max_tokens

        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            done = await asyncio.gather(*(one(urls[i % len(urls)]) for i in range(clients)))
            out.append(sum(done) / (time.perf_counter() - start))
        return out


def _offline(args, deployment: str, clients: list[int]) -> dict:
    """The offline engine's rounds, in a spawned process (its FFN ranks as `afd ffn` processes)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ffn, env = None, {}
    if deployment != "monolithic":
        # the supervised FFN ranks and the offline attention rank share one rendezvous secret
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), SECRET_ENV: new_secret()}
        ffn_argv = ["ffn", *engine_argv(args, deployment, MAX_MODEL_LEN)]
        ffn = subprocess.Popen([sys.executable, "-m", "afd_compile.cli", *ffn_argv],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    worker = ctx.Process(target=_offline_main, args=(results, args, deployment, clients, env))
    worker.start()
    try:
        worker.join()
        if results.empty():
            raise RuntimeError(f"the offline {deployment} engine exited with code {worker.exitcode}")
        return results.get()
    finally:
        if ffn is not None:
            os.killpg(ffn.pid, 15)
            ffn.wait(60)


def _offline_main(results, args, deployment: str, clients: list[int], env: dict) -> None:
    os.environ.update(env)
    from afd_compile.compile_cache import use_compile_cache
    from afd_compile.config import AFDConfig, EngineConfig
    from afd_compile.engine.llm_engine import LLMEngine
    from afd_compile.engine.rank import Rank
    from afd_compile.engine.sampling_params import SamplingParams

    use_compile_cache()  # the one the servers filled: this run measures, it does not compile
    cfg = EngineConfig(model=args.model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len or MAX_MODEL_LEN,
                       dtype=args.dtype, enforce_eager=args.enforce_eager)
    if deployment == "monolithic":
        engine, rank = LLMEngine(cfg), Rank()
    else:
        from afd_compile.roles.worker import attention_engine

        afd = AFDConfig(afd_size=deployment, role="attention", rank=0, micro_batches=args.micro_batches,
                        connector=args.connector)
        engine, rank = attention_engine(cfg, afd)
    try:
        engine.warm_up()
        prompt = engine.tokenizer(PROMPT)["input_ids"]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        out = {}
        for b in clients:
            out[b] = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                engine.generate([prompt] * b, params)
                out[b].append(b * args.max_tokens / (time.perf_counter() - start))
        results.put(out)
    finally:
        rank.close()


def run(args) -> dict:
    clients = [int(c) for c in args.clients.split(",")]
    if max(clients) > args.max_num_seqs:
        raise AfdError(f"--clients up to {max(clients)} needs --max-num-seqs >= {max(clients)}")
    rows, results = [], {}
    for deployment in args.deployments.split(","):
        served = _served(args, deployment, clients)
        offline = _offline(args, deployment, clients)
        results[deployment] = {"startup_s": served["startup_s"], "clients": {}}
        for b in clients:
            rounds = served["rounds"][b]
            median = statistics.median(rounds)
            r = {"served_tok_s": median, "offline_tok_s": statistics.median(offline[b]), "served_rounds": rounds,
                 "offline_rounds": offline[b], "slowest_vs_median": min(rounds) / median}
            r["served_vs_offline"] = r["served_tok_s"] / r["offline_tok_s"]
            results[deployment]["clients"][b] = r
            rows.append([deployment, b, r["served_tok_s"], r["offline_tok_s"], r["served_vs_offline"],
                         r["slowest_vs_median"], served["startup_s"]])
    print(format_table(["deployment", "clients", "served tok/s", "offline tok/s", "served/offline",
                        "slowest/median round", "start-up s"], rows))
    result = {"scenario": "serve", "mode": "closed loop", "machine": machine_info(),
              "config": {"model": str(args.model), "prompt": PROMPT, "max_tokens": args.max_tokens,
                         "rounds": args.rounds, "max_num_seqs": args.max_num_seqs, "dtype": args.dtype,
                         "micro_batches": args.micro_batches, "connector": args.connector,
                         "enforce_eager": args.enforce_eager},
              "results": results}
    print(f"wrote {write_json(result, 'serve_closed_loop', args.out)}")
    return result
