"""Small building blocks shared by both halves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels import cpu_build
from moe_kernels.cpu_moe import STREAM_DTYPES, linear_prefers_stream


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as the HF reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# A compiled CPU step may stream a weight through the C++ kernel for up to this many rows, when
# the weight is large enough to be read from memory: a smaller one is read from cache, and
# inductor fusing its matmul with the neighbouring ops is worth more (the demo model's layers).
STREAM_MAX_ROWS = 16
STREAM_MIN_BYTES = 1 << 20


class Linear(nn.Linear):
    """nn.Linear; in a compiled CPU decode step with a few rows, the weight can be streamed once
    through moe_kernels' C++ kernel (fp32 accumulation), called from the graph without Python.
    Decode reads weights: that kernel reads 2-byte ones faster than oneDNN on AVX2 machines or
    inductor's generated loops, and fp32 ones faster than MKL's small-M sgemm (which packs the
    weight first), while oneDNN on AMX wins from a few bf16 rows on. Which is faster at a shape
    is measured when the step is traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1]
        if (self.bias is None and torch.compiler.is_compiling() and x.device.type == "cpu" and cpu_build.LOADED
                and w.dtype in STREAM_DTYPES and rows <= STREAM_MAX_ROWS
                and w.numel() * w.element_size() >= STREAM_MIN_BYTES
                and linear_prefers_stream(rows, *w.shape, w.dtype)):
            return torch.ops.moe_cpu.linear(x, w)
        return F.linear(x, w, self.bias)


class SwiGLU(nn.Module):
    """DeepSeek's dense MLP and shared experts: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
