"""Scheduler policy: a long prompt's chunked prefill alternates with decode steps, so running
requests wait at most one chunk per generated token."""

from afd_compile.engine.block_manager import BlockManager
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.scheduler import Scheduler
from afd_compile.engine.sequence import Sequence


def test_long_prefill_alternates_with_decode():
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=8, eos_token_ids={2}, max_model_len=128,
                      block_manager=BlockManager(num_blocks=32, block_size=4))
    short = Sequence([5] * 4, SamplingParams(max_tokens=50))
    sched.add(short)
    first = sched.schedule()
    assert first.is_prefill and first.seqs == [short]
    assert sched.computed(first) == [0] and short.num_computed == 4  # its whole prompt: sample
    sched.append_token(short, 7)

    long = Sequence([6] * 20, SamplingParams(max_tokens=5))  # 3 chunks of at most 8 tokens
    sched.add(long)
    kinds, due = [], []
    for _ in range(6):
        batch = sched.schedule()
        kinds.append("P" if batch.is_prefill else "D")
        if batch.is_prefill:
            assert sum(batch.chunk_lens) <= 8
        else:
            assert long not in batch.seqs or not long.is_prefill  # never decode a half-cached prompt
        ready = sched.computed(batch)
        due.append([batch.seqs[i] for i in ready])
        for seq in due[-1]:
            sched.append_token(seq, 7)
    # The step after short's own prefill decodes it; then the long prompt's 3 chunks interleave.
    assert kinds == ["D", "P", "D", "P", "D", "P"]
    assert [long.num_computed, len(short)] == [20, 4 + 4]
    # long is sampled only after its last chunk; short once per decode step
    assert due == [[short], [], [short], [], [short], [long]]


def test_a_decode_short_of_blocks_preempts_the_latest_admitted_and_recomputes_it_later():
    """Three sequences, room for two: the third admitted is preempted when a decode needs a block,
    waits at the front, and is admitted again (all its tokens to recompute) once one finishes."""
    blocks = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=set(), max_model_len=64,
                      block_manager=blocks)
    a, b, c = (Sequence([5 + i] * 4, SamplingParams(max_tokens=m)) for i, m in enumerate((2, 8, 8)))
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()  # a, b, c admitted: one block each, one free
    assert batch.is_prefill and batch.seqs == [a, b, c] and blocks.num_free == 1
    for i in sched.computed(batch):
        sched.append_token(batch.seqs[i], 7)
    batch = sched.schedule()  # each decode writes position 4, a new block: only one is free
    assert not batch.is_prefill and batch.seqs == [a, b]
    assert c.status.value == "waiting" and sched.waiting[0] is c and not c.block_table and c.num_computed == 0
    assert sched.num_preemptions == 2 - 1 and blocks.num_free == 0
    for i in sched.computed(batch):
        sched.append_token(batch.seqs[i], 7)  # a reaches max_tokens 2: finished, its blocks free
    assert a.finished and blocks.num_free == 2
    batch = sched.schedule()  # c is readmitted: prompt and its one output token, recomputed
    assert batch.is_prefill and batch.seqs == [c] and batch.chunk_lens == [5]
    assert sched.computed(batch) == [0]  # c is due its next token
