"""The Triton grouped expert matmul (moe_kernels/triton_moe.py) against the naive per-token loop.

On a CUDA GPU the compiled kernels run, plus a CUDA-graph capture and replay. Without one, the
same checks run through Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU tensors) in a
subprocess, since the interpreter is chosen when the kernel is defined, at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_kernels import select_experts
from tests.test_moe_kernels import as_dicts, naive_moe

# (tokens, experts held, first expert, experts in all, top_k, hidden, intermediate)
CASES = [
    (1, 8, 0, 8, 2, 64, 32),
    (37, 8, 0, 8, 2, 48, 24),  # K not a multiple of the tile
    (37, 4, 4, 8, 2, 64, 32),  # expert-parallel rank 1 of 2: other pairs contribute nothing
    (5, 16, 0, 16, 6, 32, 40),  # more experts than rows: most runs empty
    (300, 8, 0, 8, 3, 32, 16),  # > 1024 pairs would switch tiles; 900 pairs: many blocks per expert
    (0, 8, 0, 8, 2, 32, 16),
]


def _case(tokens, num_local, first, num_experts, top_k, hidden, inter, device, dtype):
    g = torch.Generator().manual_seed(tokens * 7 + first)
    x = torch.randn(tokens, hidden, generator=g)
    weights, ids = select_experts(3 * torch.randn(tokens, num_experts, generator=g), top_k)
    w13 = torch.randn(num_local, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_local, hidden, inter, generator=g) / inter ** 0.5
    x, w13, w2 = (t.to(dtype).float() for t in (x, w13, w2))  # the oracle sees the same rounded inputs
    want = naive_moe(x, as_dicts(weights, ids), w13, w2, first)
    args = [t.to(device) for t in (x, weights, ids)] + [w.to(device, dtype) for w in (w13, w2)]
    args[0] = args[0].to(dtype)
    return args, want


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def check_against_naive_loop(device: str, dtypes) -> None:
    from moe_kernels.triton_moe import triton_fused_experts

    for dtype in dtypes:
        tol = TOLERANCE[dtype]
        for case in CASES:
            args, want = _case(*case, device, dtype)
            got = triton_fused_experts(*args, case[2])
            assert got.dtype == dtype and got.shape == want.shape, case
            torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


def check_block_alignment(device: str) -> None:
    """Every local pair appears once, each block holds one expert's pairs, padding is the sentinel."""
    from moe_kernels.triton_moe import align_block_size

    ids = torch.tensor([[3, 1], [1, 7], [3, 5], [6, 1]], device=device)
    sorted_pairs, block_expert, num_padded = align_block_size(ids, 1, 4, 4)  # experts 1..4 are ours
    sp, be = sorted_pairs.cpu().view(-1, 4), block_expert.cpu()
    pairs = ids.numel()
    assert int(num_padded) == 8  # expert 1: 3 pairs -> 4 rows, expert 3: 2 -> 4 rows
    assert sorted(p for p in sp[:2].flatten().tolist() if p < pairs) == [0, 1, 2, 4, 7]
    for block, expert in zip(sp[:2], be[:2].tolist()):
        assert all(ids.flatten()[p].item() - 1 == expert for p in block.tolist() if p < pairs)
    assert (sp[2:] == pairs).all()


def run_checks(device: str) -> None:
    check_block_alignment(device)
    # Triton's interpreter computes bfloat16 dot products wrongly (triton 3.9): fp32 only there.
    check_against_naive_loop(device, (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_triton_moe_on_gpu():
    run_checks("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_triton_moe_replays_in_cuda_graph():
    """Oracle: eager calls. The layer captured once replays new routings correctly (no host syncs)."""
    from moe_kernels.triton_moe import triton_fused_experts

    args, _ = _case(*CASES[1], "cuda", torch.bfloat16)
    static = [a.clone() for a in args]
    triton_fused_experts(*static, 0)  # compiles the kernels outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_fused_experts(*static, 0)
    for seed in range(3):
        new = [a.clone() for a in args]
        new[0] = torch.randn_like(new[0])
        new[2] = torch.roll(new[2], seed + 1, 0)  # other routings, same shapes
        for s, n in zip(static, new):
            s.copy_(n)
        graph.replay()
        torch.testing.assert_close(out, triton_fused_experts(*new, 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the compiled kernels are tested instead")
def test_triton_moe_interpreted_on_cpu():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = "from tests.test_triton_moe import run_checks; run_checks('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
