"""Grouped SwiGLU expert MLP over rows already sorted by expert (see dispatch.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu(
    x: torch.Tensor,  # [rows, hidden], rows grouped by expert
    counts: list[int],  # rows per expert
    w13: torch.Tensor,  # [experts, 2 * intermediate, hidden]: gate rows then up rows
    w2: torch.Tensor,  # [experts, hidden, intermediate]
) -> torch.Tensor:
    out = torch.empty_like(x)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = x[start : start + n]
        gate, up = (rows @ w13[expert].t()).chunk(2, dim=-1)
        out[start : start + n] = (F.silu(gate) * up) @ w2[expert].t()
        start += n
    return out
