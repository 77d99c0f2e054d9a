"""The attention half of a DeepSeek-V2 decoder layer: h + MLA(input_layernorm(h)).

Runs on attention ranks (and in the monolithic engine). MLA is computed in its absorbed
form: queries are projected into the kv_lora_rank latent space (W_UK) so attention reads the
compressed cache directly, and the latent output is expanded by W_UV afterwards. Nothing of
size [heads, seq, head_dim] is ever materialised from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from afd_compile.model.kv_cache import MLAKVCache
from afd_compile.model.layers import Linear, RMSNorm
from afd_compile.model.rope import apply_rope


@dataclass
class AttentionInputs:
    """Where each token sits: shared by all layers of one forward."""

    positions: torch.Tensor  # [B, L] position of each token (rope and causal mask)
    slot_mapping: torch.Tensor  # [B, L] cache row of each token's latent (kv_cache.py; scratch for padding)
    block_tables: torch.Tensor  # [B, W] the cache blocks of each row's positions
    cos: torch.Tensor  # [B, L, rope_dim // 2]
    sin: torch.Tensor
    context_blocks: int  # KV blocks read per row (kv_cache.context_blocks); dynamic when compiled


def softmax_scale(hf_config) -> float:
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    params = hf_config.rope_parameters
    mscale_all_dim = params.get("mscale_all_dim", 0) if params.get("rope_type", "default") != "default" else 0
    if mscale_all_dim and params["factor"] > 1:
        mscale = 0.1 * mscale_all_dim * math.log(params["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


# Compiled on CPU, attention over the cache is written as broadcast products that inductor turns
# into single loops reading each row's cache slot in place. As einsums they become one tiny GEMM
# call per row (bmm) after copying every row's context out of the cache: at decode sizes that
# call and copy overhead is most of the attention's time. Eagerly the products would materialise
# [B, L, H, S, D], so eager (and GPU) runs keep the einsums.
def _fuse_as_loops(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and t.device.type == "cpu"


def attention_scores(q: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """q [B, L, H, D], ctx [B, S, D] -> q . ctx [B, H, L, S]."""
    if _fuse_as_loops(q):
        return (q.unsqueeze(3) * ctx[:, None, None]).sum(-1).transpose(1, 2)
    return torch.einsum("blhd,bsd->bhls", q, ctx)


def attention_values(probs: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """probs [B, H, L, S], ctx [B, S, C] -> probs @ ctx [B, L, H, C]."""
    if _fuse_as_loops(probs):
        return (probs.transpose(1, 2).unsqueeze(-1) * ctx[:, None, None]).sum(3)
    return torch.einsum("bhls,bsc->blhc", probs, ctx)


class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk_dim = self.num_heads * (self.nope + self.rope)
        bias = cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=bias)
        self.scale = softmax_scale(cfg)
        self.kv_cache: MLAKVCache | None = None

    def forward(self, x: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, L, self.num_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, inp.cos.unsqueeze(2), inp.sin.unsqueeze(2))

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe, inp.cos, inp.sin)
        self.kv_cache.write(inp.slot_mapping, latent, k_pe)
        ctx_latent, ctx_rope = self.kv_cache.read(inp.block_tables, inp.context_blocks)  # [B, S, C], [B, S, R]

        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("blhd,hdc->blhc", q_nope, w_uk)
        scores = (attention_scores(q_latent, ctx_latent) + attention_scores(q_pe, ctx_rope)) * self.scale
        visible = torch.arange(ctx_latent.shape[1], device=x.device) <= inp.positions.unsqueeze(-1)  # [B, L, S]
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        out_latent = attention_values(probs, ctx_latent)
        out = torch.einsum("blhc,hvc->blhv", out_latent, w_uv)
        return self.o_proj(out.flatten(2))


class AttentionHalf(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)

    def forward(self, h: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), inp)
