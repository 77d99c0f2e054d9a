"""Roofline accounting: what a decode step must read and a prefill must compute, against what
this machine does in the same run.

Decode reads weights: a step's floor is the bytes it must move divided by the machine's read
bandwidth. Those bytes are every weight other than the embedding (attention, norms, dense MLPs,
shared experts, routers, lm_head), plus the routed experts the step touched (each once, however
many of the batch's tokens chose it), plus the KV cache the live sequences attend over. Touched
experts are counted, not estimated: after the measured runs, each request's tokens are run
through the model once more with every MoE layer's routing recorded, and each decode step's
batch is the union of its tokens' experts. Prefill is compute: FLOPs of the weights each token
uses plus causal attention, against the rate of a large matmul measured here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

MIN_BANDWIDTH_BYTES = 1 << 30


def l3_bytes() -> int | None:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def read_bandwidth(repeats: int = 5) -> dict:
    """Bytes/s of a multi-threaded fp32 sum over an array at least 4x the L3 (and >= 1 GiB), so
    every read comes from memory; the best of `repeats` (the least disturbed)."""
    l3 = l3_bytes()
    nbytes = max(MIN_BANDWIDTH_BYTES, 4 * (l3 or 0))
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return {"bytes_per_s": nbytes / min(times), "array_bytes": nbytes, "l3_bytes": l3,
            "threads": torch.get_num_threads()}


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> dict:
    """FLOP/s of an n x n x n matmul in `dtype` (compute-bound: the prefill's physical limit)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return {"flop_per_s": 2 * n ** 3 / min(times), "n": n, "dtype": str(dtype).removeprefix("torch.")}


def _split(model) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
    """The monolithic model's weights a decode step reads whatever the routing (all but the
    embedding table), and one routed expert's matrices per MoE layer."""
    other = [model.lm_head.weight, model.norm.weight, *model.attention_halves.parameters()]
    experts = {}
    for i, half in enumerate(model.ffn_halves):
        if half.is_moe:
            e = half.mlp.experts
            experts[i] = [e.gate_up_proj[0], e.down_proj[0]]
            other += [p for name, p in half.named_parameters() if ".experts." not in f".{name}"]
        else:
            other += list(half.parameters())
    return other, experts


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> dict:
    """Bytes of the weights every decode step reads, and of one routed expert per MoE layer."""
    other, experts = _split(model)
    return {"non_expert": _nbytes(other), "per_expert": {i: _nbytes(e) for i, e in experts.items()}}


def kv_bytes_per_position(model) -> int:
    cache = model.attention_halves[0].self_attn.kv_cache
    per = (cache.latent.shape[-1] + cache.k_rope.shape[-1]) * cache.latent.element_size()
    return per * len(model.attention_halves)


@torch.inference_mode()
def routed_experts(engine, prompts: list[list[int]], outputs: list[list[int]]) -> dict[int, list[list[int]]]:
    """Per MoE layer, per request, the expert ids each position's token was routed to, from one
    forward over prompt + outputs (the last output never entered the model). Writes the first KV
    blocks of an idle engine (its prefix cache is reset after); the model's numerics are the
    decode step's up to float order."""
    from afd_compile.model.decoder import padded_batch

    model = engine.model
    seqs = [p + o[:-1] for p, o in zip(prompts, outputs)]
    tokens, positions, write, read, L = padded_batch(seqs, model)
    B = len(seqs)
    recorded: dict[int, torch.Tensor] = {}
    originals = {}
    for i, half in enumerate(model.ffn_halves):
        if half.is_moe:
            moe = originals[i] = half.mlp

            def route(x, _moe=moe, _i=i):
                weights, ids = type(_moe).route(_moe, x)
                recorded[_i] = ids.view(B, L, -1)
                return weights, ids
            moe.route = route
    try:
        model(tokens, positions, write, read, torch.zeros(B, dtype=torch.long), model.context_blocks(L))
    finally:
        for moe in originals.values():
            del moe.route
        engine.scheduler.block_manager.reset_prefix_cache()
    return {i: [recorded[i][b, :len(s)].tolist() for b, s in enumerate(seqs)] for i in recorded}


def decode_step_bytes(engine, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """Bytes the decode steps of one measured run must read, per step and in all: weights, the
    experts each step's batch touched (counted through routed_experts), the live KV cache."""
    w = weight_bytes(engine.model)
    routing = routed_experts(engine, prompts, outputs)
    kv = kv_bytes_per_position(engine.model)
    steps = len(outputs[0]) - 1  # the first output came from prefill
    per_step, touched_per_step = [], []
    for j in range(1, steps + 1):  # step j feeds output j-1 at position len(prompt) + j - 1
        touched = {layer: set().union(*(r[len(p) + j - 1] for r, p in zip(rows, prompts)))
                   for layer, rows in routing.items()}
        expert_bytes = sum(len(ids) * w["per_expert"][layer] for layer, ids in touched.items())
        kv_read = sum(len(p) + j for p in prompts) * kv
        per_step.append(w["non_expert"] + expert_bytes + kv_read)
        touched_per_step.append(sum(map(len, touched.values())) / max(len(touched), 1))
    return {"bytes_per_step": sum(per_step) / len(per_step), "non_expert_bytes": w["non_expert"],
            "per_expert_bytes": sorted(set(w["per_expert"].values())),
            "touched_experts_per_layer": sum(touched_per_step) / len(touched_per_step),
            "moe_layers": len(routing), "kv_bytes_per_position": kv}


def prefill_flops(model, prompts: list[list[int]]) -> float:
    """FLOPs a prefill of these prompts must do: 2 per weight each token uses (non-expert weights
    but the embedding lookup, plus top_k routed experts per MoE layer) and MLA attention over
    the causal prefix, in its absorbed form."""
    cfg = model.cfg
    other, experts = _split(model)
    per_token = sum(t.numel() for t in other) + sum(cfg.num_experts_per_tok * sum(t.numel() for t in e)
                                                    for e in experts.values())
    tokens = sum(map(len, prompts))
    causal = sum(n * (n + 1) / 2 for n in map(len, prompts))  # (query, key) pairs
    attn = 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    return 2 * per_token * tokens + attn * causal
