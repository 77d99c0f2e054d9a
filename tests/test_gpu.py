"""GPU path: compiled decode on CUDA, and the AFD attention step with NCCL send/recv captured
in CUDA graphs. Oracle: the CPU monolithic engine's greedy tokens. These run only where CUDA
GPUs are present (the project's device machine); everywhere else they skip, saying why."""

from __future__ import annotations

import pytest
import torch

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams
from tests.afd_harness import run_afd
from tests.test_afd_exactness import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="AFD over NCCL needs one GPU per rank, 2 for 1A1F (NCCL refuses two ranks on one GPU)")


def cpu_tokens(model_dir):
    engine = LLMEngine(EngineConfig(model=model_dir, enforce_eager=True, max_num_seqs=8, max_model_len=96))
    return [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]


@needs_gpu
def test_compiled_decode_on_cuda_matches_cpu(shipped_model):
    engine = LLMEngine(EngineConfig(model=shipped_model, device="cuda", max_num_seqs=8, max_model_len=96,
                                    batch_buckets=(8,)))
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == cpu_tokens(shipped_model)


@needs_gpu
def test_warm_up_on_cuda_compiles_every_shape_before_any_request(shipped_model):
    """On CUDA the decode step is one guarded torch.compile (CUDA graph trees): warm_up compiles
    and captures each (batch, context) bucket pair, and requests afterwards compile nothing."""
    from torch._dynamo.utils import counters

    engine = LLMEngine(EngineConfig(model=shipped_model, device="cuda", max_num_seqs=8, max_model_len=96,
                                    batch_buckets=(4, 8)))
    engine.warm_up()
    assert engine.runner._compiled == {(b, ctx) for b in (4, 8) for ctx in (64, 96)}
    before = counters["stats"]["unique_graphs"]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == cpu_tokens(shipped_model)
    assert counters["stats"]["unique_graphs"] == before


@needs_two_gpus
@pytest.mark.parametrize("m", [1, 2])
def test_afd_nccl_cuda_graph_matches_cpu(shipped_model, m):
    out = run_afd(shipped_model, "1A1F", PROMPTS, GREEDY, micro_batches=m, connector="nccl", device="cuda",
                  enforce_eager=False, batch_buckets=(4, 8))
    assert out["tokens"] == cpu_tokens(shipped_model)
