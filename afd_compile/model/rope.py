"""Rotary embedding for MLA's decoupled rope dims.

Frequencies and the yarn attention factor come from transformers' ROPE_INIT_FUNCTIONS, so
every rope_scaling a real checkpoint uses (default, linear, dynamic, yarn, ...) is computed
the way the reference computes it. The rotation is DeepSeek's interleaved-pair form, written
with real arithmetic rather than complex tensors so inductor can fuse it.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_tables(hf_config, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_positions, qk_rope_head_dim // 2], fp32."""
    params = hf_config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = hf_config.qk_rope_head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq.float())
    return freqs.cos() * scaling, freqs.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., rope_dim] rotated pairwise; cos/sin broadcast to [..., rope_dim // 2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
