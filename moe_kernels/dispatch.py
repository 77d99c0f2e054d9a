"""Sort-based dispatch and combine.

Instead of DeepSpeed's dense [tokens, experts, capacity] one-hot dispatch, the (token, k)
pairs are sorted by expert id, so each expert sees one contiguous slice of rows and no token
is dropped. Combine scatters the weighted expert outputs back with one index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    token_idx: torch.Tensor  # [pairs] source row of each dispatched pair, in expert order
    weights: torch.Tensor  # [pairs] routing weight of each pair
    counts: list[int]  # rows per local expert


def dispatch(topk_ids: torch.Tensor, topk_weights: torch.Tensor, first_expert: int, num_local: int) -> Dispatch:
    """Groups the (token, k) pairs routed to experts [first_expert, first_expert + num_local).

    Pairs routed to other experts (other expert-parallel ranks) are dropped here: they are
    computed, and combined, by the rank that owns them.
    """
    top_k = topk_ids.shape[1]
    local = topk_ids.flatten() - first_expert
    keep = (local >= 0) & (local < num_local)
    pair_idx = keep.nonzero().squeeze(1)
    local = local[pair_idx]
    order = local.argsort(stable=True)
    pair_idx = pair_idx[order]
    counts = torch.bincount(local, minlength=num_local).tolist()
    return Dispatch(pair_idx // top_k, topk_weights.flatten()[pair_idx], counts)


def combine(expert_out: torch.Tensor, plan: Dispatch, num_tokens: int) -> torch.Tensor:
    """Sums each token's weighted expert outputs: [pairs, hidden] -> [tokens, hidden]."""
    out = expert_out.new_zeros(num_tokens, expert_out.shape[1])
    weighted = expert_out * plan.weights.unsqueeze(1).to(expert_out.dtype)
    return out.index_add_(0, plan.token_idx, weighted)
