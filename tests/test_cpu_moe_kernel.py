"""The C++ weight-streaming MoE kernel (moe_kernels/csrc) and the per-shape choice on CPU.

Oracle: the per-expert loop of transformers' DeepseekV2Moe in float64, on the same weights
(for bf16 / fp16 weights, the same rounded weights), at DeepSeek-V2-Lite's layer widths with a
few tokens and a sample of its 64 experts, so each case stays fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import cpu_moe, select_experts
from moe_kernels.cpu_build import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels(), reason="the C++ CPU kernels could not be built here")

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 1408, 64, 6  # DeepSeek-V2-Lite's MoE layer


def loop_reference(x, weights, ids, w13, w2, first_expert):
    """sum_k weight_k * SwiGLU_k(x) over the experts held (ids first_expert ...), in float64."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, k = torch.where(ids == first_expert + e)
        if token.numel():
            gate, up = (x[token] @ w13[e].t()).chunk(2, dim=-1)
            out.index_add_(0, token, ((F.silu(gate) * up) @ w2[e].t()) * weights[token, k, None].double())
    return out


def wide_layer(num_local: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_local, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(dtype)
    w2 = (torch.randn(num_local, HIDDEN, INTER, generator=gen) / INTER ** 0.5).to(dtype)
    return w13, w2


def routing(tokens: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    return x, *select_experts(torch.randn(tokens, EXPERTS, generator=gen), TOP_K)


def rel_err(got, ref) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_stream_kernel_matches_loop_at_v2_lite_width(tokens):
    """8 of the 64 experts held (global ids 16..23, an expert-parallel slice), so pairs routed
    elsewhere must count zero; one to sixteen tokens, as decode batches are."""
    w13, w2 = wide_layer(8)
    x, weights, ids = routing(tokens)
    ids[0, 0] = 17  # at least one pair lands on a held expert
    got = cpu_moe.stream_experts(x, weights, ids, w13, w2, 16)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert rel_err(got, loop_reference(x, weights, ids, w13, w2, 16)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_kernel_reads_half_precision_weights_accumulating_in_fp32(dtype):
    """2-byte weights, fp32 activations: the result is the float64 product of the same rounded
    weights up to fp32 summation (1e-5), not bf16's 1e-2: nothing is rounded to 2 bytes but the
    weights themselves."""
    w13, w2 = wide_layer(4, dtype)
    x, weights, ids = routing(5)
    ids[:, 0] = torch.arange(5) % 4  # every held expert has rows
    got = cpu_moe.stream_experts(x, weights, ids, w13, w2, 0)
    assert rel_err(got, loop_reference(x, weights, ids, w13, w2, 0)) < 1e-5


def test_bf16_weights_close_to_fp32_weights():
    """bf16 against fp32 at the same weights before rounding: within 2% of the output's scale
    (bf16 keeps 8 bits of mantissa; errors average out over the 2048- and 1408-long sums)."""
    w13, w2 = wide_layer(4)
    x, weights, ids = routing(4)
    ids[:, 0] = torch.arange(4)
    fp32 = cpu_moe.stream_experts(x, weights, ids, w13, w2, 0)
    bf16 = cpu_moe.stream_experts(x.bfloat16(), weights, ids, w13.bfloat16(), w2.bfloat16(), 0)
    assert bf16.dtype == torch.bfloat16
    assert rel_err(bf16, fp32.double()) < 2e-2


def test_stream_kernel_with_no_held_expert_routed_is_zero():
    w13, w2 = wide_layer(2)
    x, weights, ids = routing(3)
    ids.fill_(40)
    assert cpu_moe.stream_experts(x, weights, ids, w13, w2, 0).abs().max() == 0


def test_kernel_choice_is_measured_once_per_shape_and_exact(monkeypatch):
    """The first call at a shape times both kernels and keeps the faster; later calls at the same
    token bucket reuse it without measuring; both kernels give the loop's result."""
    monkeypatch.setattr(cpu_moe, "_choice", {})
    w13, w2 = wide_layer(4)
    calls = []
    for name, fn in list(cpu_moe.IMPLS.items()):
        monkeypatch.setitem(cpu_moe.IMPLS, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    x, weights, ids = routing(6)
    ids[:, 0] = torch.arange(6) % 4
    out = cpu_moe.cpu_fused_experts(x, weights, ids, w13, w2, 0)
    assert sorted(set(calls)) == ["sort", "stream"] and len(calls) == 4  # each run twice, second timed
    assert rel_err(out, loop_reference(x, weights, ids, w13, w2, 0)) < 1e-5
    (key, name), = cpu_moe.chosen().items()
    assert key[0] == 8 and name in ("sort", "stream")  # 6 tokens: the bucket of 8
    calls.clear()
    x7, w7, i7 = routing(7, seed=2)
    i7[:, 0] = torch.arange(7) % 4
    out7 = cpu_moe.cpu_fused_experts(x7, w7, i7, w13, w2, 0)
    assert calls == [name] and len(cpu_moe.chosen()) == 1
    assert rel_err(out7, loop_reference(x7, w7, i7, w13, w2, 0)) < 1e-5


def test_float64_weights_take_the_sort_path(monkeypatch):
    monkeypatch.setattr(cpu_moe, "_choice", {})
    w13, w2 = wide_layer(2, torch.float64)
    x, weights, ids = routing(2)
    ids[:, 0] = 1
    out = cpu_moe.cpu_fused_experts(x.double(), weights, ids, w13, w2, 0)
    assert list(cpu_moe.chosen().values()) == ["sort"]
    assert rel_err(out, loop_reference(x, weights, ids, w13, w2, 0)) < 1e-12


@torch._dynamo.config.patch(recompile_limit=16)  # one graph per token count
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_moe_layer_exact_at_every_batch_bucket(dtype):
    """A MoE layer's routed output, compiled with static shapes as a decode step is, at every
    default batch bucket and past them: whichever kernel each shape takes (16 experts top-4: one
    expert per pair at 1 token in fp32, the C++ kernel inside the graph up to 32 tokens, one
    expert per pair again up to 64, the measured op beyond), the float64 loop's result."""
    from types import SimpleNamespace

    from afd_compile.config import DEFAULT_BUCKETS
    from afd_compile.model.ffn_half import MoE

    cfg = SimpleNamespace(hidden_size=256, n_routed_experts=16, moe_intermediate_size=96, n_shared_experts=0,
                          num_experts_per_tok=4, topk_method="greedy", n_group=1, topk_group=1,
                          norm_topk_prob=False, routed_scaling_factor=1.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    moe = moe.to(dtype)
    moe.gate.float()
    torch._dynamo.reset()
    step = torch.compile(moe.routed, dynamic=False, fullgraph=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for tokens in (*DEFAULT_BUCKETS, 128):
        x = torch.randn(tokens, cfg.hidden_size).to(dtype)
        weights, ids = moe.route(x)
        ref = loop_reference(x, weights, ids, moe.experts.gate_up_proj, moe.experts.down_proj, 0)
        with torch.inference_mode():
            assert rel_err(step(x), ref) < tol, f"{tokens} tokens"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_stream_linear_matches_float64_matmul(dtype, rows):
    """x @ w^T at a dense layer's width (2048 -> 2816), the 2-byte weights widened in registers:
    within fp32 summation of the float64 product of the same rounded weights; any leading shape."""
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(dtype)
    x = torch.randn(1, rows, HIDDEN, generator=gen)
    y = torch.ops.moe_cpu.linear(x, w)
    assert y.shape == (1, rows, 2 * INTER) and y.dtype == torch.float32
    assert rel_err(y, x.double() @ w.double().t()) < 1e-5
    assert torch.ops.moe_cpu.linear(x.to(dtype), w).dtype == dtype


@pytest.mark.parametrize("bias,stream_faster", [(False, True), (False, False), (True, True)])
def test_compiled_bf16_linear_equals_eager(bias, stream_faster, monkeypatch):
    """Oracle: F.linear in float64 on the same bf16 weights. A compiled decode-sized call (4 rows)
    with bf16 weights streams them through the C++ kernel where that measured faster, else (and
    with a bias) keeps F.linear; either within bf16's rounding of the output."""
    from afd_compile.model import layers
    from afd_compile.model.layers import Linear

    monkeypatch.setattr(layers, "linear_prefers_stream", lambda *shape: stream_faster)

    torch.manual_seed(0)
    layer = Linear(1024, 1024, bias=bias).to(torch.bfloat16)  # 2 MB: large enough to stream
    x = torch.randn(4, 1, 1024).to(torch.bfloat16)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # dynamo's graph, to see which op it calls
        graphs.append(gm)
        return gm.forward

    with torch.inference_mode():
        got = torch.compile(layer, backend=backend, dynamic=False, fullgraph=True)(x)
    targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert (torch.ops.moe_cpu.linear.default in targets or torch.ops.moe_cpu.linear in targets) == \
        (stream_faster and not bias)
    ref = torch.nn.functional.linear(x.double(), layer.weight.double(), None if layer.bias is None else
                                     layer.bias.double())
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) < 1e-2


def test_linear_choice_measured_once_per_row_bucket(monkeypatch):
    """The stream-or-F.linear choice is a measurement at the shape's row bucket, kept for the process."""
    monkeypatch.setattr(cpu_moe, "_linear_choice", {})
    first = cpu_moe.linear_prefers_stream(3, 256, 512, torch.bfloat16)
    assert isinstance(first, bool) and list(cpu_moe._linear_choice) == [(4, 256, 512, torch.bfloat16)]
    assert cpu_moe.linear_prefers_stream(4, 256, 512, torch.bfloat16) == first
    assert len(cpu_moe._linear_choice) == 1


def test_kernel_build_failure_is_one_warning_and_the_torch_path(monkeypatch, caplog):
    """No compiler (or headers, or linker): one warning line, and the caller falls back."""
    import torch.utils.cpp_extension

    from moe_kernels import cpu_build

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'moe_cpu': c++: command not found\nmore detail")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
    with caplog.at_level("WARNING", logger="afd.kernels"):
        assert cpu_build.cpu_kernels.__wrapped__() is False
    (record,) = caplog.records
    assert "C++ CPU kernels unavailable" in record.message and "command not found" in record.message
    assert "\n" not in record.message
