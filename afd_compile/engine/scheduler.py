"""Waiting and running queues, KV slot allocation, and what happens after a token is sampled.

Each step is either a prefill step (admit waiting requests while KV slots and the prefill
token budget allow; long prompts are cut into chunks) or a decode step over every running
request whose prompt is cached. When both are pending they alternate, so a long prompt
delays running requests by at most one chunk (max_num_batched_tokens) per token they
generate. Finished requests free their slot at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from afd_compile.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    chunk_lens: list[int]  # prefill only: prompt tokens computed this step per sequence


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int, eos_token_ids: set[int], max_model_len: int):
        self.free_slots = deque(range(num_slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.budget = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
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
        return ScheduledBatch(decodable, False, []) if decodable else None

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, chunks, budget = [], [], self.budget
        # Chunks of prompts already admitted come first, then new admissions.
        for seq in [s for s in self.running if s.is_prefill]:
            n = min(len(seq.prompt_token_ids) - seq.num_computed, budget)
            if n > 0:
                seqs.append(seq), chunks.append(n)
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.free_slots.popleft(), Status.RUNNING
            self.running.append(seq)
            n = min(len(seq.prompt_token_ids), budget)
            seqs.append(seq), chunks.append(n)
            budget -= n
        return ScheduledBatch(seqs, True, chunks) if seqs else None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None

    def computed(self, batch: ScheduledBatch) -> list[int]:
        """Records the tokens a step computed (a prefill's chunks, a decode's one token each);
        returns the indices in batch.seqs of the sequences now due a sampled token: all of a
        decode, and of a prefill those whose whole prompt is now cached."""
        if not batch.is_prefill:
            for seq in batch.seqs:
                seq.num_computed = len(seq)
            return list(range(len(batch.seqs)))
        for seq, n in zip(batch.seqs, batch.chunk_lens):
            seq.num_computed += n
        return [i for i, seq in enumerate(batch.seqs) if not seq.is_prefill]

    def append_token(self, seq: Sequence, token: int) -> None:
        """Records a sampled token and finishes the sequence on EOS / stop id / max_tokens / context."""
        seq.output_token_ids.append(token)
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish(seq, "stop")
        elif len(seq.output_token_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            self.finish(seq, "length")
