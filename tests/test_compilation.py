"""afd_compile.compilation: the shape-keyed, unguarded compiled steps, their replay without dynamo,
the context buckets, dynamo's recompile limit and the persistent input buffers.

Oracles: dynamo's own graph counter, a function's eager result, and dynamo's config.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from afd_compile.compilation import (CompiledPerShape, CpuGpuBuffer, allow_decode_recompiles, context_bucket,
                                     context_buckets, context_spans)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_each_shape_key_gets_its_own_graph_and_counts_once_compiled(caplog):
    """CompiledPerShape (the decode steps' dispatcher): one graph per key, none again for a key's
    later calls (fail_on_recompile), and a key whose first call failed is not counted compiled.
    Each compile is one INFO line naming the shape and its seconds."""
    def step(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 5:
            raise ValueError("no graph for 5 rows")
        return x * 2 + 1

    steps = CompiledPerShape(step, "step", torch.device("cpu"), lambda key: f"test step ({key[0]} rows)")
    before = graphs()
    a, b = torch.arange(4.0), torch.arange(6.0)
    with caplog.at_level("INFO", logger="afd.compile"):
        assert torch.equal(steps((4,), a), a * 2 + 1) and torch.equal(steps((6,), b), b * 2 + 1)
        assert graphs() - before == 2 and (4,) in steps and (6,) in steps
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(steps((4,), a + 1), a * 2 + 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "afd.compile"]
    assert [re.sub(r"[\d.]+ s$", "N s", line) for line in lines] == [
        "compiled test step (4 rows) in N s", "compiled test step (6 rows) in N s"]
    with pytest.raises(Exception, match="no graph for 5 rows"):
        steps((5,), torch.arange(5.0))
    assert (5,) not in steps


def test_a_key_called_again_with_its_tensors_replays_its_graph_without_dynamo():
    """A decode step is always given the same (persistent) tensors: such a call goes straight to
    the compiled graph with the inputs dynamo gathered last time, reading their current values
    and rebuilding the result's structure; a call with other tensors goes through dynamo."""
    weight = torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False)  # gathered by dynamo, as model weights are

    def step(x: torch.Tensor, scale: int) -> dict:
        return {"y": [x * weight + scale], "z": x.sum()}

    steps = CompiledPerShape(step, "step", torch.device("cpu"))
    x = torch.arange(3.0)
    first = steps((3,), x, 1)
    compiled, replay = steps.compiled[(3,)]
    through_dynamo = []
    steps.compiled[(3,)] = (lambda *args: through_dynamo.append(args) or compiled(*args)), replay
    x.add_(1)
    weight.data.mul_(10)
    again = steps((3,), x, 1)
    assert through_dynamo == [] and again is not first
    assert torch.equal(again["y"][0], x * 20 + 1) and again["z"].item() == x.sum().item()
    other = torch.ones(3)
    assert torch.equal(steps((3,), other, 1)["y"][0], other * 20 + 1) and len(through_dynamo) == 1
    assert torch.equal(steps((3,), other, 1)["y"][0], other * 20 + 1) and len(through_dynamo) == 1  # now replayed


def test_context_buckets_double_from_64_up_to_the_context_length():
    assert context_buckets(32) == (32,) and context_buckets(96) == (64, 96)
    assert context_buckets(512) == (64, 128, 256, 512)
    assert [context_bucket(n, 512) for n in (1, 64, 65, 300, 512)] == [64, 64, 128, 512, 512]


def test_one_graph_serves_every_context_span():
    """context_spans' tensors (as long as the KV blocks a step over the bucket reads, at least
    two) are marked dynamic over the buckets' range: a step keyed by batch alone compiles once and
    gives every span's eager result."""
    spans = context_spans(256, 16)
    assert sorted(spans) == [64, 128, 256] and all(t.shape == (n // 16,) for n, t in spans.items())
    assert [t.shape[0] for t in context_spans(128, 64).values()] == [2, 2]  # 1 block would be specialised
    steps = CompiledPerShape(lambda x, span: x.sum() * span.shape[0], "span", torch.device("cpu"))
    x, before = torch.ones(4), graphs()
    assert [steps((4,), x, spans[n]).item() for n in (64, 128, 256)] == [16.0, 32.0, 64.0]
    assert graphs() - before == 1


def test_recompile_limit_is_raised_only_by_the_explicit_call_and_never_lowered():
    """Building the compiled machinery changes no process-wide setting; allow_decode_recompiles
    raises the limit to the bucket pairs plus one, and never below what it already is."""
    with torch._dynamo.config.patch(recompile_limit=8):
        CompiledPerShape(lambda x: x, "noop", torch.device("cpu"))
        assert torch._dynamo.config.recompile_limit == 8
        allow_decode_recompiles((1, 2, 4, 8), 512)  # 4 batch buckets x 4 context buckets
        assert torch._dynamo.config.recompile_limit == 17
        allow_decode_recompiles((1,), 64)
        assert torch._dynamo.config.recompile_limit == 17


def test_cpu_gpu_buffer_on_cpu_is_one_tensor_written_through_numpy():
    """On CPU the device copy is the host tensor itself (no copy per step); numpy stores show in it."""
    buf = CpuGpuBuffer(3, 4, device=torch.device("cpu"))
    assert buf.gpu is buf.cpu and buf.cpu.dtype == torch.long
    buf.np[1, :2] = [7, 9]
    assert buf.copy_to_gpu() is buf.cpu and buf.gpu[1].tolist() == [7, 9, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the host/device copy")
def test_cpu_gpu_buffer_copies_the_host_rows_to_the_device():
    buf = CpuGpuBuffer(2, 3, device=torch.device("cuda"))
    gpu = buf.gpu
    assert gpu.device.type == "cuda" and gpu is not buf.cpu
    buf.np[:] = [[1, 2, 3], [4, 5, 6]]
    assert buf.copy_to_gpu() is gpu and gpu.cpu().tolist() == [[1, 2, 3], [4, 5, 6]]
