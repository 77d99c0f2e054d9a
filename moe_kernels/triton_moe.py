"""Triton grouped expert matmul for GPUs: the routed experts of a MoE layer in two kernel
launches, following vLLM's fused_moe design.

The (token, k) pairs are sorted by expert and each expert's run is padded to a multiple of
BLOCK_M (`align_block_size`), so every BLOCK_M rows of the sorted list belong to one expert:
one program computes a [BLOCK_M, BLOCK_N] tile of `rows @ W[expert]^T`, gathering its rows
straight from the unsorted activations. Everything is sized by the token count alone, with
no host synchronisation, so the layer can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr, sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
    N, K, num_pairs, top_k,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROWS_ARE_TOKENS: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[pair] = (a[row(pair)] @ b[expert]^T) * (weight[pair] if MUL_WEIGHT) for one tile."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # beyond the padded pairs of this step: the grid is sized for the worst case
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_m)
    valid = pair < num_pairs  # padding rows carry the sentinel num_pairs
    row = pair // top_k if A_ROWS_ARE_TOKENS else pair
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if IEEE:  # fp32 weights: match torch's fp32 matmul instead of rounding through tf32
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align_block_size(topk_ids: torch.Tensor, first_expert: int, num_local: int, block_m: int):
    """Sorted pair ids with each local expert's run padded to block_m (sentinel = pair count),
    the expert of every block, and the padded length (a 1-element tensor, read on device).
    Pairs routed to other ranks' experts are left out."""
    pairs = topk_ids.numel()
    dev = topk_ids.device
    local = topk_ids.flatten() - first_expert
    local = torch.where((local >= 0) & (local < num_local), local, num_local)  # num_local: not ours
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, local, torch.ones_like(local))
    counts = counts[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    max_padded = triton.cdiv(pairs + num_local * (block_m - 1), block_m) * block_m
    order = local.argsort(stable=True)
    sorted_local = local[order]
    ours = sorted_local < num_local
    e = sorted_local.clamp(max=num_local - 1)
    rank_in_expert = torch.arange(pairs, device=dev) - (counts.cumsum(0) - counts)[e]
    dest = torch.where(ours, (ends - padded)[e] + rank_in_expert, max_padded)
    sorted_pairs = torch.full((max_padded + 1,), pairs, dtype=torch.long, device=dev)
    sorted_pairs.scatter_(0, dest, order)
    block_start = torch.arange(0, max_padded, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp(max=num_local - 1)
    return sorted_pairs[:max_padded], block_expert, ends[-1:]


def _grouped_gemm(a, b, c, weights, plan, top_k, a_rows_are_tokens, block_m):
    sorted_pairs, block_expert, num_padded = plan
    N, K = b.shape[1], b.shape[2]
    block_n = 64 if N >= 64 else triton.next_power_of_2(max(N, 16))
    block_k = 64 if K >= 64 else triton.next_power_of_2(max(K, 16))
    grid = (block_expert.numel() * triton.cdiv(N, block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, weights, sorted_pairs, block_expert, num_padded,
        N, K, c.shape[0], top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROWS_ARE_TOKENS=a_rows_are_tokens, MUL_WEIGHT=weights is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def triton_fused_experts(
    x: torch.Tensor,  # [tokens, hidden]
    topk_weights: torch.Tensor,  # [tokens, top_k]
    topk_ids: torch.Tensor,  # [tokens, top_k], global expert ids
    w13: torch.Tensor,  # [local_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [local_experts, hidden, intermediate]
    first_expert: int,
) -> torch.Tensor:
    """Sum over k of topk_weights * SwiGLU_expert(x), for the experts this rank holds."""
    tokens, top_k = topk_ids.shape
    pairs = tokens * top_k
    # Small decode batches leave most of a large tile empty; 16 is tl.dot's minimum.
    block_m = 16 if pairs <= 1024 else 64
    plan = align_block_size(topk_ids, first_expert, w13.shape[0], block_m)
    gate_up = x.new_empty(pairs, w13.shape[1])
    _grouped_gemm(x, w13, gate_up, None, plan, top_k, True, block_m)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up
    # Pairs of other ranks' experts are never written: zeros, so the sum over k skips them.
    out = x.new_zeros(pairs, w2.shape[1])
    _grouped_gemm(act, w2, out, topk_weights.flatten().float().contiguous(), plan, top_k, False, block_m)
    return out.view(tokens, top_k, w2.shape[1]).sum(dim=1)
