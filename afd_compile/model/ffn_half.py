"""The FFN half of a DeepSeek-V2 decoder layer: h + MLP(post_attention_layernorm(h)).

Runs on FFN ranks (and in the monolithic engine). The first `first_k_dense_replace` layers
have a dense SwiGLU; the rest DeepSeekMoE: a gate over n_routed_experts, the routed experts
(of which an expert-parallel rank holds only its contiguous share) and shared experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afd_compile.model.layers import RMSNorm, SwiGLU
from moe_kernels import cpu_build, fused_experts, select_experts


# CPU, in a compiled decode step: moe_kernels' C++ kernel, called from the graph without Python,
# reads each touched expert's weights once however many (token, k) pairs chose it (decode at
# width is bound by reading them). Its per-row work is not register-blocked, so past
# STREAM_MAX_ROWS_PER_EXPERT rows an expert on average it turns compute-bound (measured), and
# small experts (the demo model's, in cache) are then faster as one expert evaluation per pair
# inside the graph, where inductor fuses the weight gather into its loops; that also holds for
# a single token with fp32 weights (top_k distinct experts: the same bytes), while inductor's
# loops read 2-byte weights slower than the kernel (measured: 18 vs 23 GB/s). Otherwise, and
# eagerly, the fused_experts op picks a kernel by measuring at the shape. GPUs take the Triton
# grouped matmul at every size.
STREAM_MAX_ROWS_PER_EXPERT = 8
GATHERED_MAX_PAIRS = 256


def gathered_experts(x, topk_weights, topk_ids, w13, w2, first_expert: int) -> torch.Tensor:
    """x [tokens, hidden] -> sum_k weight_k * expert_k(x), one expert evaluation per (token, k).
    Under torch.compile the weight gather fuses into the matmul loops; eagerly it would copy
    each pair's expert weights."""
    tokens, top_k = topk_ids.shape
    num_local = w13.shape[0]
    local = topk_ids - first_expert
    keep = (local >= 0) & (local < num_local)  # other ranks' experts count zero
    idx = local.clamp(0, num_local - 1).flatten()
    pairs = x.unsqueeze(1).expand(tokens, top_k, x.shape[1]).reshape(tokens * top_k, x.shape[1])
    gate, up = torch.einsum("ph,pih->pi", pairs, w13[idx]).chunk(2, dim=-1)
    y = torch.einsum("pi,phi->ph", F.silu(gate) * up, w2[idx]).view(tokens, top_k, -1)
    return (y * (topk_weights * keep).unsqueeze(-1).to(y.dtype)).sum(dim=1)


class Experts(nn.Module):
    """Routed expert weights of one layer, stacked as transformers v5 stores them."""

    def __init__(self, num_local: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, intermediate))


class MoE(nn.Module):
    def __init__(self, cfg, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        num_local = cfg.n_routed_experts // ep_size
        self.first_expert = ep_rank * num_local
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_routed_experts, bias=False)
        self.experts = Experts(num_local, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # Set by an FFN rank with ep_size > 1: computes every expert's share for this rank's tokens
        # (see set_expert_parallel); None means all experts are local.
        self.ep_routed = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (topk_weights, topk_ids) [tokens, top_k]; the gate runs in fp32."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.gate.weight.float())
        return select_experts(logits, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group, cfg.topk_group,
                              cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' output, [tokens, hidden]."""
        if self.ep_routed is not None:
            return self.ep_routed(x)
        weights, ids = self.route(x)
        args = (x, weights, ids, self.experts.gate_up_proj, self.experts.down_proj, self.first_expert)
        if not x.is_cuda and torch.compiler.is_compiling():
            pairs, num_local = ids.numel(), self.experts.down_proj.shape[0]
            if x.shape[0] == 1 and self.experts.down_proj.dtype == torch.float32:
                return gathered_experts(*args)
            if cpu_build.LOADED and pairs <= STREAM_MAX_ROWS_PER_EXPERT * num_local:
                return torch.ops.moe_cpu.grouped_experts(*args)
            if pairs <= GATHERED_MAX_PAIRS:
                return gathered_experts(*args)
        return fused_experts(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.routed(flat)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class FFNHalf(nn.Module):
    def __init__(self, cfg, layer_idx: int, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense_replace
        self.mlp = MoE(cfg, ep_rank, ep_size) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))


def set_expert_parallel(ffn_halves, ep_rank: int, ep_size: int, group, dispatch: str = "sort") -> None:
    """Makes every MoE layer exchange tokens with the other FFN ranks of `group`.

    dispatch "deepspeed": DeepSpeed-MoE's MOELayer (capacity-based, all-to-all); "sort": the
    sort-based variable-size all-to-all of moe_kernels. Both exact.
    """
    from afd_compile.model.deepspeed_moe import deepspeed_routed
    from moe_kernels.ep_dispatch import ep_fused_experts

    for half in ffn_halves:
        moe = half.mlp
        if not half.is_moe:
            continue
        if dispatch == "deepspeed":
            moe.ep_routed = deepspeed_routed(moe, ep_size, group)
        else:
            moe.ep_routed = (lambda m: lambda x: ep_fused_experts(
                x, *m.route(x), m.experts.gate_up_proj, m.experts.down_proj, ep_rank, ep_size, group))(moe)


def clear_expert_parallel(ffn_halves) -> None:
    """Drops a broken world's group: its sockets close, so that the other FFN ranks notice at once,
    only when nothing references it any more."""
    for half in ffn_halves:
        if half.is_moe:
            half.mlp.ep_routed = None
