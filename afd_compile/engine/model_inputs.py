"""A step's model inputs from scheduled sequences: where each token's latent goes in the paged
KV cache (slot_mapping) and which blocks each row attends over (block tables). Shared by the
monolithic runner and the AFD attention rank's."""

from __future__ import annotations

import torch

from afd_compile.compilation import CpuGpuBuffer
from afd_compile.engine.sequence import Sequence
from afd_compile.model.decoder import DeepseekV2
from afd_compile.model.kv_cache import slot_rows, table_row


def prefill_inputs(model: DeepseekV2, seqs: list[Sequence], chunk_lens: list[int]):
    """tokens, positions, slot_mapping [B, L], block tables [B, W], last_idx [B] of a prefill
    over the uncomputed tokens of each sequence, right-padded (padding in the scratch block)."""
    B, L, bs, scratch = len(seqs), max(chunk_lens), model.block_size, model.scratch_block
    tokens = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, L, dtype=torch.long)
    slot_mapping = torch.full((B, L), scratch * bs, dtype=torch.long)
    for i, (seq, n) in enumerate(zip(seqs, chunk_lens)):
        start = seq.num_computed
        tokens[i, :n] = torch.tensor(seq.token_ids[start : start + n])
        positions[i, :n] = torch.arange(start, start + n)
        slot_mapping[i, :n] = torch.tensor(slot_rows(seq.block_table, start, n, bs))
    tables = torch.tensor([table_row(s.block_table, model.block_table_width, scratch) for s in seqs])
    return tokens, positions, slot_mapping, tables, torch.tensor(chunk_lens) - 1


class DecodeRows:
    """A decode batch bucket's persistent inputs: per row the token, its position and cache row,
    and the block table; rewritten in place each step (padding rows on the scratch block)."""

    def __init__(self, rows: int, model: DeepseekV2, device: torch.device):
        self.model = model
        self.rows = CpuGpuBuffer(3, rows, device=device)
        self.tables = CpuGpuBuffer(rows, model.block_table_width, device=device)
        r = self.rows.gpu
        # tokens [B, 1], positions [B, 1], slot_mapping [B, 1], block tables [B, W]
        self.inputs = (r[0].view(rows, 1), r[1].view(rows, 1), r[2].view(rows, 1), self.tables.gpu)
        # The block ids each row's table holds: a row whose sequence's table is unchanged is not
        # rewritten (comparing lists is far cheaper than a numpy row write per row and step).
        # None: never staged.
        self._tables: list[list[int] | None] = [None] * rows

    def stage(self, seqs: list[Sequence]) -> None:
        """The first len(seqs) rows for seqs, the rest of the bucket padding."""
        n, bs, scratch = len(seqs), self.model.block_size, self.model.scratch_block
        staged, tables = self.rows.np, self.tables.np
        staged[0, :n] = [s.last_token_id for s in seqs]
        staged[1, :n] = [len(s) - 1 for s in seqs]
        staged[2, :n] = [s.block_table[(len(s) - 1) // bs] * bs + (len(s) - 1) % bs for s in seqs]
        staged[:, n:] = ((0,), (0,), (scratch * bs,))
        for i, held in enumerate(self._tables):
            table = seqs[i].block_table if i < n else []  # padding rows: all scratch
            if held != table:
                tables[i, : len(table)] = table
                tables[i, len(table) :] = scratch
                self._tables[i] = list(table)
        self.rows.copy_to_gpu()
        self.tables.copy_to_gpu()
