"""Routed-expert computation as one custom op: dispatch, grouped matmul, combine (on CUDA
the Triton kernels of triton_moe.py; on CPU cpu_moe.py's weight-streaming C++ kernel or the
sort-based torch path, whichever measures faster at the shape).

Registered with torch.library so torch.compile sees a single opaque op with a static output
shape: the per-expert row counts are data-dependent, which would otherwise force graph
breaks or recompiles every step (vLLM registers its fused_moe the same way).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("moe_kernels::fused_experts", mutates_args=())
def fused_experts(
    x: torch.Tensor,  # [tokens, hidden]
    topk_weights: torch.Tensor,  # [tokens, top_k]
    topk_ids: torch.Tensor,  # [tokens, top_k], global expert ids
    w13: torch.Tensor,  # [local_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [local_experts, hidden, intermediate]
    first_expert: int,
) -> torch.Tensor:
    """Sum over k of topk_weights * expert(x), for the experts this rank holds."""
    if x.is_cuda:
        from moe_kernels.triton_moe import triton_fused_experts

        return triton_fused_experts(x, topk_weights, topk_ids, w13, w2, first_expert)
    from moe_kernels.cpu_moe import cpu_fused_experts

    return cpu_fused_experts(x, topk_weights, topk_ids, w13, w2, first_expert)


@fused_experts.register_fake
def _(x, topk_weights, topk_ids, w13, w2, first_expert):
    return torch.empty_like(x)
