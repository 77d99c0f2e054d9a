"""Scheduler policy: a long prompt's chunked prefill alternates with decode steps, so running
requests wait at most one chunk per generated token."""

from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.scheduler import Scheduler
from afd_compile.engine.sequence import Sequence


def test_long_prefill_alternates_with_decode():
    sched = Scheduler(num_slots=4, max_num_batched_tokens=8, eos_token_ids={2}, max_model_len=128)
    short = Sequence([5] * 4, SamplingParams(max_tokens=50))
    sched.add(short)
    first = sched.schedule()
    assert first.is_prefill and first.seqs == [short]
    short.num_computed = 4
    sched.append_token(short, 7)

    long = Sequence([6] * 20, SamplingParams(max_tokens=5))  # 3 chunks of at most 8 tokens
    sched.add(long)
    kinds = []
    for _ in range(6):
        batch = sched.schedule()
        kinds.append("P" if batch.is_prefill else "D")
        if batch.is_prefill:
            for seq, n in zip(batch.seqs, batch.chunk_lens):
                seq.num_computed += n
            assert sum(batch.chunk_lens) <= 8
        else:
            assert long not in batch.seqs or not long.is_prefill  # never decode a half-cached prompt
            for seq in batch.seqs:
                seq.num_computed = len(seq)
                sched.append_token(seq, 7)
    # The step after short's own prefill decodes it; then the long prompt's 3 chunks interleave.
    assert kinds == ["D", "P", "D", "P", "D", "P"]
    assert not long.is_prefill
