"""Runs a whole AFD deployment inside the test process's children.

The ranks are forked from the test process, which has already imported torch and
transformers, so a topology starts in about a second instead of paying every import per rank
(the CLI path, `afd generate --afd-size`, is tested separately with real subprocesses).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import torch

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.engine import SamplingParams
from afd_compile.roles.rendezvous import free_port


def _rank_main(role: str, rank: int, engine_cfg: EngineConfig, afd_kwargs: dict, prompts, params, port: int,
               results, warm_up: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        afd = AFDConfig(role=role, rank=rank, **afd_kwargs)
        if role == "ffn":
            from afd_compile.roles.worker import run_ffn

            results.put((role, rank, {"params": run_ffn(engine_cfg, afd)}))
            return
        from afd_compile.roles.worker import attention_engine

        engine, attention = attention_engine(engine_cfg, afd)
        if warm_up:
            engine.warm_up()
        steps = engine.runner.decode_step
        warm = set(steps.compiled) if steps is not None else set()
        mine = list(range(rank, len(prompts), afd.topology.num_attention))
        outs = engine.generate([prompts[i] for i in mine], params) if mine else []
        param_counts = sum(p.numel() for p in engine.model.parameters())
        attention.close()
        blocks = engine.scheduler.block_manager
        results.put((role, rank, {"tokens": {i: o.token_ids for i, o in zip(mine, outs)}, "params": param_counts,
                                  "preemptions": engine.scheduler.num_preemptions, "prefix_hits": blocks.hits,
                                  "kv_usage_after": blocks.usage(),
                                  "warm": warm, "compiled": set(steps.compiled) - warm if steps is not None else set()}))
    except BaseException:
        results.put((role, rank, {"error": traceback.format_exc()}))


# EngineConfig's KV cache options, passed through run_afd's keyword arguments
KV_OPTIONS = ("block_size", "kv_cache_memory_bytes", "enable_prefix_caching", "max_num_batched_tokens")


def run_afd(model_dir, afd_size: str, prompts: list, params: SamplingParams, micro_batches: int = 1,
            timeout_s: float = 240, warm_up: bool = False, **afd_kwargs) -> dict:
    """Greedy AFD generation: returns {"tokens": [token ids per prompt], "params": {(role, rank): count},
    "warm": {attention rank: compiled step shapes before the requests (after warm_up)}, "compiled":
    {attention rank: step shapes compiled while serving them}, "kv": {attention rank: its preemptions,
    prefix cache hits (tokens) and KV cache usage after}}."""
    # CUDA cannot be used in a child forked after the parent touched it: spawn for GPU runs.
    ctx = mp.get_context("spawn" if str(afd_kwargs.get("device", "cpu")).startswith("cuda") else "fork")
    results = ctx.Queue()
    engine_cfg = EngineConfig(model=model_dir, enforce_eager=afd_kwargs.pop("enforce_eager", True),
                              max_num_seqs=afd_kwargs.pop("max_num_seqs", 8),
                              max_model_len=afd_kwargs.pop("max_model_len", 96),
                              batch_buckets=afd_kwargs.pop("batch_buckets", (1, 2, 4, 8)),
                              device=afd_kwargs.pop("device", "cpu"),
                              **{k: afd_kwargs.pop(k) for k in KV_OPTIONS if k in afd_kwargs})
    afd = dict(afd_size=afd_size, micro_batches=micro_batches, timeout_s=afd_kwargs.pop("connector_timeout", 60),
               **afd_kwargs)
    topo = AFDConfig(**afd).topology
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(role, r, engine_cfg, afd, prompts, params, port, results, warm_up))
             for role in ("ffn", "attention") for r in range(topo.num_ranks(role))]
    for p in procs:
        p.start()
    collected = {}
    try:
        for _ in procs:
            role, rank, payload = results.get(timeout=timeout_s)
            if payload and "error" in payload:
                raise AssertionError(f"{role} rank {rank} failed:\n{payload['error']}")
            collected[(role, rank)] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    tokens = {}
    for (role, _), payload in collected.items():
        if role == "attention":
            tokens.update(payload["tokens"])
    attention = {rank: payload for (role, rank), payload in collected.items() if role == "attention"}
    return {"tokens": [tokens[i] for i in range(len(prompts))],
            "params": {k: v["params"] for k, v in collected.items()},
            "warm": {r: p["warm"] for r, p in attention.items()},
            "compiled": {r: p["compiled"] for r, p in attention.items()},
            "kv": {r: {k: p[k] for k in ("preemptions", "prefix_hits", "kv_usage_after")} for r, p in attention.items()}}
