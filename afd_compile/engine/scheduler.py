"""Waiting and running queues, KV block admission, preemption, and what happens after a token
is sampled.

Each step is either a prefill step (admit waiting requests while the batch and free KV blocks
allow and the prefill token budget lasts; long prompts are cut into chunks) or a decode step
over every running request whose prompt is cached. When both are pending they alternate, so a
long prompt delays running requests by at most one chunk (max_num_batched_tokens) per token
they generate. A decode step that needs a block when none is free preempts the most recently
admitted running request: its blocks are freed and it waits at the front of the queue, to
recompute its tokens when blocks free up (vLLM's recompute preemption). Finished requests free
their blocks at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from afd_compile.engine.block_manager import BlockManager
from afd_compile.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    chunk_lens: list[int]  # prefill only: tokens computed this step per sequence


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, eos_token_ids: set[int], max_model_len: int,
                 block_manager: BlockManager):
        self.max_num_seqs = max_num_seqs
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.budget = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.num_preemptions = 0
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        decodable = [s for s in self.running if not s.is_prefill]
        prefill = None if (decodable and self._last_was_prefill) else self._schedule_prefill()
        self._last_was_prefill = prefill is not None
        if prefill is not None:
            return prefill
        seqs = self._schedule_decode(decodable)
        return ScheduledBatch(seqs, False, []) if seqs else None

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, chunks, budget = [], [], self.budget
        # Chunks of sequences already admitted come first, then new admissions.
        for seq in [s for s in self.running if s.is_prefill]:
            n = min(len(seq) - seq.num_computed, budget)
            if n > 0:
                seqs.append(seq), chunks.append(n)
                budget -= n
        while (self.waiting and len(self.running) < self.max_num_seqs and budget > 0
               and self.block_manager.allocate(self.waiting[0])):  # cached prefix blocks count as computed
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            seqs.append(seq), chunks.append(n)
            budget -= n
        return ScheduledBatch(seqs, True, chunks) if seqs else None

    def _schedule_decode(self, decodable: list[Sequence]) -> list[Sequence]:
        """The decodable sequences that have a block for their next position, preempting the most
        recently admitted running ones (this one last) while blocks are short."""
        seqs = []
        for seq in decodable:
            if seq.status is not Status.RUNNING:  # preempted for an earlier one
                continue
            while not self.block_manager.append_slot(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                seqs.append(seq)
        return seqs

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def computed(self, batch: ScheduledBatch) -> list[int]:
        """Records the tokens a step computed (a prefill's chunks, a decode's one token each);
        returns the indices in batch.seqs of the sequences now due a sampled token: all of a
        decode, and of a prefill those with every token cached."""
        blocks = self.block_manager
        if not batch.is_prefill:
            for seq in batch.seqs:
                seq.num_computed += 1
                blocks.cache_full_blocks(seq)
            return list(range(len(batch.seqs)))
        for seq, n in zip(batch.seqs, batch.chunk_lens):
            seq.num_computed += n
            blocks.cache_full_blocks(seq)
        return [i for i, seq in enumerate(batch.seqs) if seq.num_computed == len(seq)]

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def append_token(self, seq: Sequence, token: int) -> None:
        """Records a sampled token and finishes the sequence on EOS / stop id / max_tokens / context."""
        seq.output_token_ids.append(token)
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish(seq, "stop")
        elif len(seq.output_token_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            self.finish(seq, "length")
