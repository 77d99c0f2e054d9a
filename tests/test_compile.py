"""The decode step compiled with torch.compile (inductor, static shapes, one graph per batch bucket).

One compiled engine for the whole module: on CPU each bucket costs tens of seconds to compile.
Oracles: dynamo's own graph counter (exactly one graph per bucket, none after warm-up, and
error_on_recompile turns any recompilation into an exception) and the eager engine's greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams

PROMPTS = ["1 2 3", "5 6 7 8 9", "10 20 30 40 50 60 70 80 90 100 110", "999", "4 4 4 4 4 4", "17 18"]
# Staggered lengths with 4 slots: requests finish at different steps and waiting ones are
# admitted into freed slots, so the decode batch takes every size from 4 down to 1.
MAX_TOKENS = [2, 9, 5, 12, 7, 3]
CONFIG = dict(max_num_seqs=4, batch_buckets=(2, 4), max_model_len=32)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def params(max_tokens=MAX_TOKENS) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]


@pytest.fixture(scope="module")
def compiled(tiny_greedy_checkpoint):
    """(engine, decode batch sizes seen, graphs compiled while warming up both buckets)."""
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, **CONFIG))
    assert engine.config.batch_buckets == (2, 4)
    sizes = []
    decode = engine.runner.decode

    def recording_decode(seqs):
        sizes.append(len(seqs))
        return decode(seqs)

    engine.runner.decode = recording_decode
    before = graphs()
    engine.generate(PROMPTS[:1], params([3]))  # bucket 2
    engine.generate(PROMPTS[:4], params([3] * 4))  # bucket 4
    assert 1 in sizes and 4 in sizes
    return engine, sizes, graphs() - before


def test_one_graph_per_bucket_and_no_recompiles_in_steady_state(compiled):
    engine, sizes, warmup_graphs = compiled
    assert warmup_graphs == 2  # compiled (not eager) and exactly once per bucket
    sizes.clear()
    before = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            out = engine.generate(PROMPTS, params())
            assert [len(c.token_ids) for c in out] == MAX_TOKENS
    assert set(sizes) == {1, 2, 3, 4}, sizes
    assert len(sizes) > 30
    assert graphs() == before


def test_compiled_and_eager_give_the_same_greedy_tokens(compiled, tiny_greedy_checkpoint):
    engine = compiled[0]
    eager = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, **CONFIG))
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = engine.generate(PROMPTS, params())
    want = eager.generate(PROMPTS, params())
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    # Each request alone in the compiled engine (bucket 2, padded with the scratch slot) agrees too.
    with torch._dynamo.config.patch(error_on_recompile=True):
        alone = [engine.generate([p], params([m]))[0].token_ids for p, m in zip(PROMPTS, MAX_TOKENS)]
    assert alone == [c.token_ids for c in want]


def test_warm_up_compiles_every_decode_shape_before_any_request(tiny_greedy_checkpoint):
    """LLMEngine.warm_up compiles one graph per batch bucket up front, each serving every context
    bucket (the span is dynamic): requests that then cross every bucket (batch 4 down to 1,
    context past 64) compile nothing more, and their tokens are the eager engine's (the warm-up
    wrote only the scratch slot)."""
    config = dict(model=tiny_greedy_checkpoint, max_num_seqs=4, batch_buckets=(2, 4), max_model_len=96)
    engine = LLMEngine(EngineConfig(**config))
    start = graphs()
    engine.warm_up()
    assert set(engine.runner.decode_steps.compiled) == {(2,), (4,)} and graphs() - start == 2
    prompts = [*PROMPTS[:3], " ".join(str(i) for i in range(60))]  # 60 numbers + 12 new: past 64 tokens
    max_tokens = [2, 9, 5, 12]
    assert len(engine.tokenizer(prompts[3])["input_ids"]) + max_tokens[3] > 64
    before = graphs()
    got = engine.generate(prompts, params(max_tokens))
    assert graphs() == before
    want = LLMEngine(EngineConfig(enforce_eager=True, **config)).generate(prompts, params(max_tokens))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
