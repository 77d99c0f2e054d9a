"""MoE kernels: expert selection (gating), sort-based dispatch/combine and grouped expert
matmuls. Plain torch on CPU; the grouped matmul is registered as a custom op so
torch.compile treats its data-dependent shapes as opaque."""

from moe_kernels.gating import select_experts
from moe_kernels.fused_moe import fused_experts

__all__ = ["select_experts", "fused_experts"]
