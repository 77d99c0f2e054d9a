"""DeepSeekMoE expert selection: softmax scores, greedy or group-limited top-k."""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor,  # [tokens, n_routed_experts], fp32
    top_k: int,
    topk_method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [tokens, top_k] fp32, topk_ids [tokens, top_k] int64).

    `group_limited_greedy` first keeps the `topk_group` groups with the best single expert,
    then takes the top-k experts inside them (DeepSeek-V2's device-limited routing).
    Weights are renormalised when `norm_topk_prob`, then scaled by `routed_scaling_factor`
    (as vLLM and DeepSeek-V3 do; DeepSeek-V2 checkpoints set norm_topk_prob false).
    """
    scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    if topk_method == "group_limited_greedy":
        tokens, experts = scores.shape
        grouped = scores.view(tokens, n_group, experts // n_group)
        group_idx = grouped.amax(dim=-1).topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros(tokens, n_group, dtype=torch.bool, device=scores.device)
        group_mask.scatter_(1, group_idx, True)
        scores = grouped.masked_fill(~group_mask.unsqueeze(-1), 0.0).view(tokens, experts)
    elif topk_method != "greedy":
        raise ValueError(f"unsupported topk_method {topk_method!r}; expected 'greedy' or 'group_limited_greedy'")
    topk_weights, topk_ids = scores.topk(top_k, dim=-1, sorted=False)
    if norm_topk_prob and top_k > 1:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids
