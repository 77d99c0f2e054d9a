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


def test_each_shape_key_gets_its_own_graph_and_counts_once_compiled(caplog):
    """CompiledPerShape (the decode steps' dispatcher): one graph per key, none again for a key's
    later calls (fail_on_recompile), and a key whose first call failed is not counted compiled.
    Each compile is one INFO line naming the shape and its seconds."""
    import re

    from afd_compile.engine.model_runner import CompiledPerShape

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
    from afd_compile.engine.model_runner import CompiledPerShape

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
    from afd_compile.engine.model_runner import context_bucket, context_buckets

    assert context_buckets(32) == (32,) and context_buckets(96) == (64, 96)
    assert context_buckets(512) == (64, 128, 256, 512)
    assert [context_bucket(n, 512) for n in (1, 64, 65, 300, 512)] == [64, 64, 128, 512, 512]


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
