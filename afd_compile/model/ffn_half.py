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
from moe_kernels.ep_dispatch import ep_fused_experts


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
    def __init__(self, cfg, ep_rank: int = 0, ep_size: int = 1, ep_dispatch: str = "sort"):
        """ep_dispatch: how an expert-parallel rank (ep_size > 1) exchanges tokens with the
        others once it has a group (set_ep_group): "sort", the sort-based variable-size
        all-to-all of moe_kernels, or "deepspeed", DeepSpeed-MoE's MOELayer (capacity-based
        all-to-all). Both exact."""
        super().__init__()
        self.cfg = cfg
        num_local = cfg.n_routed_experts // ep_size
        self.ep_rank, self.ep_size, self.ep_dispatch = ep_rank, ep_size, ep_dispatch
        self.first_expert = ep_rank * num_local
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_routed_experts, bias=False)
        self.experts = Experts(num_local, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # The FFN ranks' group of the world an expert-parallel rank serves in; None: all experts
        # are local (ep_size 1), or the world broke.
        self.ep_group = None
        self.ep_layer = None  # ep_dispatch "deepspeed": the MOELayer over ep_group

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (topk_weights, topk_ids) [tokens, top_k]; the gate runs in fp32."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.gate.weight.float())
        return select_experts(logits, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group, cfg.topk_group,
                              cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' output, [tokens, hidden]."""
        if self.ep_layer is not None:
            return self.ep_layer(x, None)
        if self.ep_group is not None:
            return ep_fused_experts(x, *self.route(x), self.experts.gate_up_proj, self.experts.down_proj,
                                    self.ep_rank, self.ep_size, self.ep_group)
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

    def set_ep_group(self, group) -> None:
        """Exchanges tokens with the other FFN ranks of `group` from now on; None drops a broken
        world's group (its sockets close, so the other FFN ranks notice at once, only when nothing
        references it any more)."""
        self.ep_group = group
        if group is None or self.ep_dispatch != "deepspeed":
            self.ep_layer = None
        else:
            from afd_compile.model.deepspeed_moe import deepspeed_layer

            self.ep_layer = deepspeed_layer(self, self.ep_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.routed(flat)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class FFNHalf(nn.Module):
    def __init__(self, cfg, layer_idx: int, ep_rank: int = 0, ep_size: int = 1, ep_dispatch: str = "sort"):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense_replace
        self.mlp = (MoE(cfg, ep_rank, ep_size, ep_dispatch) if self.is_moe
                    else SwiGLU(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))


def set_ep_group(ffn_halves, group) -> None:
    """Every MoE layer's expert-parallel group (MoE.set_ep_group)."""
    for half in ffn_halves:
        if half.is_moe:
            half.mlp.set_ep_group(group)
