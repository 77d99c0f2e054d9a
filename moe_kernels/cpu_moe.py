"""Routed experts on CPU: the C++ weight-streaming kernel or the sort-based torch path, chosen
per shape by measurement.

The C++ kernel (csrc/grouped_experts_cpu.cpp) reads each touched expert once and streams it
through every row routed to it: at decode (a few rows per expert) that is the memory roofline,
in fp32 and in bf16 / fp16. With many rows per expert (prefill) the work is compute-bound and
oneDNN/MKL's blocked GEMMs in the sort-based path win. Which one is faster at a shape depends
on the machine (ISA, AMX, cores) as much as on the shape, so the first call at each shape times
both on its real inputs and keeps the faster for the process, as inductor's autotuner does for
its kernels. Both are exact up to fp32 summation order.
"""

from __future__ import annotations

import logging
import time

import torch

from moe_kernels.cpu_build import cpu_kernels
from moe_kernels.dispatch import combine, dispatch
from moe_kernels.grouped_matmul import grouped_swiglu

log = logging.getLogger("afd.kernels")

_choice: dict[tuple, str] = {}  # shape key -> "stream" or "sort"


def sort_experts(x, topk_weights, topk_ids, w13, w2, first_expert: int) -> torch.Tensor:
    """Sort the (token, k) pairs by expert, one GEMM pair per touched expert, scatter back."""
    plan = dispatch(topk_ids, topk_weights, first_expert, w13.shape[0])
    expert_out = grouped_swiglu(x[plan.token_idx], plan.counts, w13, w2)
    return combine(expert_out, plan, x.shape[0])


def stream_experts(x, topk_weights, topk_ids, w13, w2, first_expert: int) -> torch.Tensor:
    """The C++ kernel: each touched expert's weights read once, accumulating in fp32."""
    return torch.ops.moe_cpu.grouped_experts(x, topk_weights, topk_ids, w13, w2, first_expert)


IMPLS = {"stream": stream_experts, "sort": sort_experts}
STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape_key(x, topk_ids, w13, w2) -> tuple:
    """Token counts by power-of-two bucket: prefill sees a new count at almost every call."""
    tokens = 1 << (x.shape[0] - 1).bit_length()
    return (tokens, topk_ids.shape[1], x.dtype, *w13.shape, w2.shape[2], w13.dtype)


def _timed(fn, args) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def choose(x, topk_weights, topk_ids, w13, w2, first_expert: int) -> tuple[str, torch.Tensor | None]:
    """The implementation for this call's shape, measuring the candidates on it the first time
    (each run twice, the second timed, so one-off costs such as first-touch page faults do not
    decide); also returns the output of that measurement, or None when nothing was measured."""
    key = _shape_key(x, topk_ids, w13, w2)
    if key in _choice:
        return _choice[key], None
    if w13.dtype not in STREAM_DTYPES or not cpu_kernels():
        _choice[key] = "sort"
        return "sort", None
    args = (x, topk_weights, topk_ids, w13, w2, first_expert)
    times, outs = {}, {}
    for name, fn in IMPLS.items():
        fn(*args)
        times[name], outs[name] = _timed(fn, args)
    best = min(times, key=times.get)
    _choice[key] = best
    log.debug("moe_kernels: %s for %s (%s)", best, key, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items()))
    return best, outs[best]


def chosen() -> dict[tuple, str]:
    """The choices made so far in this process: shape key -> implementation."""
    return dict(_choice)


_linear_choice: dict[tuple, bool] = {}  # (rows bucket, n, k, dtype) -> stream is faster


@torch.compiler.assume_constant_result  # called while tracing a step: the choice is a constant of its graph
def linear_prefers_stream(rows: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether the C++ weight-streaming kernel computes x [rows, k] @ w [n, k]^T faster than
    F.linear (oneDNN / MKL) at this shape and dtype, measured once per process on random data
    of the shape: which wins depends on the machine (AMX, AVX2) as much as on the rows."""
    rows = 1 << (rows - 1).bit_length()
    key = (rows, n, k, dtype)
    if key not in _linear_choice:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(rows, k, generator=gen).to(dtype)
        times = {}
        for name, fn in (("stream", torch.ops.moe_cpu.linear), ("linear", torch.nn.functional.linear)):
            fn(x, w)
            times[name] = min(_timed(fn, (x, w))[0] for _ in range(3))
        _linear_choice[key] = times["stream"] < times["linear"]
        log.debug("moe_kernels: linear %s -> %s (%s)", key, "stream" if _linear_choice[key] else "F.linear",
                  ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in times.items()))
    return _linear_choice[key]


def cpu_fused_experts(x, topk_weights, topk_ids, w13, w2, first_expert: int) -> torch.Tensor:
    name, out = choose(x, topk_weights, topk_ids, w13, w2, first_expert)
    if out is not None:
        return out
    return IMPLS[name](x, topk_weights, topk_ids, w13, w2, first_expert)
