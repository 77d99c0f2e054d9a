"""Sort-based expert-parallel dispatch: each (token, k) pair travels to the rank owning its
expert with one variable-size all-to-all, is computed there by the grouped matmul, and comes
back with a second one. Exact (no capacity, nothing dropped); the volume moved is the routed
pairs only, where a capacity-based dispatch moves [experts, capacity, hidden] per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_kernels.fused_moe import fused_experts


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


def ep_fused_experts(
    x: torch.Tensor,  # [tokens, hidden]
    topk_weights: torch.Tensor,  # [tokens, top_k]
    topk_ids: torch.Tensor,  # [tokens, top_k] global expert ids
    w13: torch.Tensor,  # this rank's experts [local, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [local, hidden, intermediate]
    ep_rank: int,
    ep_size: int,
    group,
) -> torch.Tensor:
    """Routed output of every expert for this rank's tokens, [tokens, hidden]."""
    num_local, top_k = w13.shape[0], topk_ids.shape[1]
    dest = (topk_ids // num_local).flatten()  # owning rank of each pair
    order = dest.argsort(stable=True)
    send_counts_t = torch.bincount(dest, minlength=ep_size)
    recv_counts_t = torch.empty_like(send_counts_t)
    dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()

    token_of_pair = order // top_k
    recv_x = _all_to_all(x[token_of_pair], send_counts, recv_counts, group)
    recv_ids = _all_to_all(topk_ids.flatten()[order], send_counts, recv_counts, group)
    # Weights are applied back home, so remote rows are computed with weight 1.
    ones = torch.ones(recv_ids.shape[0], 1, dtype=topk_weights.dtype)
    y = fused_experts(recv_x, ones, recv_ids.unsqueeze(1), w13, w2, ep_rank * num_local)
    back = _all_to_all(y, recv_counts, send_counts, group)
    weighted = back * topk_weights.flatten()[order].unsqueeze(1).to(back.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, weighted)
