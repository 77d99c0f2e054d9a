"""Paged KV cache: greedy tokens are the same whatever the block size, with prefix caching on or
off and with preemption forced by a pool of a few blocks, monolithic and AFD (the oracle: the
monolithic engine with prefix caching off, itself checked against transformers in
test_oracle.py); bad KV settings are one clear error."""

from __future__ import annotations

import pytest

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams
from afd_compile.errors import AfdError
from tests.afd_harness import run_afd

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# 42 tokens of shared prefix: two full blocks of 16, 42 of size 1, none of 64
PREFIX = [1, 5, *range(100, 140)]
PROMPTS = [PREFIX + q for q in ([8, 10, 12, 6], [300, 310, 6], [70, 60, 50, 6], [999, 6])] + [[1, 5, 4, 8, 6]]
MAX_MODEL_LEN = 96
# Per-layer bytes of one position in the tiny checkpoint's cache: (kv_lora 16 + rope 8) x fp32, 3 layers
POSITION_BYTES = 3 * (16 + 8) * 4
# Eight blocks of 16 positions: one sequence of max_model_len fits (6), two of the prompts above do not
FEW_BLOCKS = 8 * 16 * POSITION_BYTES


def engine(model_dir, **kv) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, enforce_eager=True, max_num_seqs=8, max_model_len=MAX_MODEL_LEN,
                                  **kv))


def tokens(engine: LLMEngine, prompts=PROMPTS) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def oracle(tiny_greedy_checkpoint):
    return tokens(engine(tiny_greedy_checkpoint, enable_prefix_caching=False))


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_block_sizes_and_prefix_hits_keep_tokens(tiny_greedy_checkpoint, oracle, block_size):
    """The second round of the same prompts finds their prefix blocks cached and skips them."""
    e = engine(tiny_greedy_checkpoint, block_size=block_size)
    assert tokens(e) == oracle
    blocks = e.scheduler.block_manager
    before = blocks.hits
    assert tokens(e) == oracle
    # every full block before each prompt's last token is a hit (blocks of 64: none is full)
    want = sum((len(p) - 1) // block_size * block_size for p in PROMPTS)
    assert blocks.hits - before == want and (want > 0) == (block_size < 64)
    assert blocks.usage() == 0.0


def test_prefix_hits_within_one_batch_admitted_over_several_steps(tiny_greedy_checkpoint, oracle):
    """A prefill budget below two prompts admits them over several steps: the later ones hit the
    blocks the first computed."""
    e = engine(tiny_greedy_checkpoint, max_num_batched_tokens=48)
    assert tokens(e) == oracle
    assert e.scheduler.block_manager.hits >= 2 * 32


def test_forced_preemption_keeps_tokens(tiny_greedy_checkpoint, oracle):
    for prefix_caching in (False, True):
        e = engine(tiny_greedy_checkpoint, kv_cache_memory_bytes=FEW_BLOCKS, enable_prefix_caching=prefix_caching)
        assert e.scheduler.block_manager.num_blocks == 8
        assert tokens(e) == oracle
        assert e.scheduler.num_preemptions > 0 and e.scheduler.block_manager.usage() == 0.0


def test_shipped_model_keeps_its_answers_with_prefix_caching_and_preemption(shipped_model):
    prompts = [" ".join(str(n + 2 * i) for i in range(6)) for n in range(1, 40, 3)]
    plain = tokens(engine(shipped_model, enable_prefix_caching=False), prompts)
    cached = engine(shipped_model, block_size=4)
    assert tokens(cached, prompts) == tokens(cached, prompts) == plain  # the second round hits
    assert cached.scheduler.block_manager.hits > 0
    few = engine(shipped_model, block_size=4, kv_cache_memory_bytes=24 * 4 * 4 * (32 + 16) * 4)  # 24 blocks of 4
    assert tokens(few, prompts) == plain and few.scheduler.num_preemptions > 0


@pytest.mark.parametrize("afd_size,m,connector", [("1A1F", 2, "shm"), ("2A2F", 2, "gloo")])
def test_afd_paged_kv_matches_monolithic(tiny_greedy_checkpoint, oracle, afd_size, m, connector):
    """Each attention rank's own pool: preemption forced there, prefix hits within its batch."""
    out = run_afd(tiny_greedy_checkpoint, afd_size, PROMPTS, GREEDY, micro_batches=m, connector=connector,
                  kv_cache_memory_bytes=FEW_BLOCKS, max_num_batched_tokens=48)
    assert out["tokens"] == oracle
    assert any(kv["preemptions"] for kv in out["kv"].values())
    assert all(kv["kv_usage_after"] == 0.0 for kv in out["kv"].values())


def test_afd_block_size_1_with_prefix_hits(tiny_greedy_checkpoint, oracle):
    out = run_afd(tiny_greedy_checkpoint, "1A1F", PROMPTS, GREEDY, micro_batches=2, connector="shm", block_size=1,
                  max_num_batched_tokens=48)
    assert out["tokens"] == oracle and out["kv"][0]["prefix_hits"] > 0


@pytest.mark.parametrize("kv, message", [
    (dict(kv_cache_memory_bytes=5 * 16 * POSITION_BYTES), "holds 5 KV blocks of 16 positions"),
    (dict(block_size=12), "block_size must be a positive power of two, got 12"),
    (dict(block_size=0), "block_size must be a positive power of two, got 0"),
])
def test_bad_kv_settings_are_one_clear_error(tiny_greedy_checkpoint, kv, message):
    with pytest.raises(AfdError, match=message):
        engine(tiny_greedy_checkpoint, **kv)
