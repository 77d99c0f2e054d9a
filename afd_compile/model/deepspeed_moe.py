"""Expert parallelism through DeepSpeed-MoE: deepspeed.moe's MOELayer (capacity-based
dispatch, all-to-all over the FFN ranks' expert group, combine) driven by a gate that does
DeepSeek's routing exactly (greedy / group-limited top-k, norm_topk_prob,
routed_scaling_factor) and drops no token: its capacity is the largest per-expert load
anywhere in the group, agreed with one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn



def init_deepspeed_comm() -> None:
    """deepspeed.comm wraps the torch.distributed world the roles already joined."""
    import deepspeed.comm as ds_comm
    import deepspeed.ops

    if not ds_comm.is_initialized():
        # On CPU, DeepSpeed's init JIT-compiles a shared-memory all-reduce extension (a C++
        # toolchain and minutes per rank). Expert parallelism needs only all_to_all_single,
        # which gloo provides, so that extension is marked unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


class DeepSeekGate(nn.Module):
    """A gate with DeepSpeed's sparse-route interface (see deepspeed.moe.sharded_moe.TopKGate)."""

    def __init__(self, route, num_experts: int):
        super().__init__()
        self.route, self.num_experts = route, num_experts  # MoE.route: DeepSeek's exact expert choice
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, x: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        weights, ids = self.route(x)  # [S, k]
        num_experts = self.num_experts
        one_hot = F.one_hot(ids.flatten(), num_experts)  # [S * k, E], pairs in token order
        locations = (one_hot.cumsum(0) - 1).gather(1, ids.flatten().unsqueeze(1)).view_as(ids)
        exp_counts = one_hot.sum(0)
        capacity = exp_counts.max().clamp(min=1).reshape(1)
        if self.ep_group is not None:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        return (torch.zeros(()), int(capacity), num_experts, ids.t().contiguous().to(torch.int32),
                locations.t().contiguous().to(torch.int32), weights.t().contiguous(), exp_counts)


class StackedExperts(nn.Module):
    """DeepSpeed's experts callable over our stacked weights: [ep, local, capacity, hidden] in and out."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        g = x.transpose(0, 1).flatten(1, 2)  # [local, ep * capacity, hidden]
        gate, up = torch.bmm(g, w13.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))
        return y.view(x.shape[1], x.shape[0], x.shape[2], -1).transpose(0, 1)


def deepspeed_layer(moe, ep_size: int, group):
    """DeepSpeed's MOELayer over moe's gate and experts, expert-parallel over group; called as
    layer(x, None)."""
    from deepspeed.moe.sharded_moe import MOELayer

    init_deepspeed_comm()
    layer = MOELayer(DeepSeekGate(moe.route, moe.cfg.n_routed_experts), StackedExperts(moe.experts),
                     "afd_ffn_ep", ep_size, moe.experts.down_proj.shape[0])
    layer._set_ep_group(group)
    return layer
