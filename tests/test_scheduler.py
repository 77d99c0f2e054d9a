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
