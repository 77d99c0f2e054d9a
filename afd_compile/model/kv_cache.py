"""Paged MLA KV cache of one layer: the compressed latent and the rope key, not full K/V.

Blocks of block_size positions, [num_blocks + 1, block_size, ...], written in place. A sequence's
positions live in the blocks of its block table (engine/block_manager.py): position p of a row
is row slot_mapping = block_table[p // block_size] * block_size + p % block_size. The extra last
block is scratch: padded rows of a batch bucket write and read there and never touch a live
request's blocks.

Reads gather whole blocks, the first `context_blocks` of each row's table, and attend over all
their positions (the causal mask hides those past each row's own). A step over n positions reads
the blocks holding them, at least two: a count of 1 dynamo would specialise, and a decode graph
compiled for a dynamic count (compilation.context_spans) must hold for every context bucket.
Block tables carry two more columns than max_seq needs, always scratch: one for that second
block, and one so every read is a strict prefix of the table (a graph compiled for a partial
read is then valid for all).
"""

from __future__ import annotations

import torch
from torch import nn


class MLAKVCache(nn.Module):
    def __init__(self, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype):
        super().__init__()
        self.block_size = block_size
        shape = (num_blocks + 1, block_size)
        self.register_buffer("latent", torch.zeros(*shape, kv_lora_rank, dtype=dtype), persistent=False)
        self.register_buffer("k_rope", torch.zeros(*shape, rope_dim, dtype=dtype), persistent=False)

    @property
    def scratch_block(self) -> int:
        return self.latent.shape[0] - 1

    def write(self, slot_mapping: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """slot_mapping [B, L] (block * block_size + offset); latent [B, L, kv_lora_rank]; k_rope [B, L, rope_dim]."""
        self.latent.view(-1, self.latent.shape[-1]).index_put_((slot_mapping,), latent)
        self.k_rope.view(-1, self.k_rope.shape[-1]).index_put_((slot_mapping,), k_rope)

    def read(self, block_tables: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first num_blocks blocks: [B, S, kv_lora_rank] and [B, S, rope_dim], S =
        num_blocks * block_size."""
        blocks = block_tables[:, :num_blocks]
        return self.latent[blocks].flatten(1, 2), self.k_rope[blocks].flatten(1, 2)


def context_blocks(n_ctx: int, block_size: int) -> int:
    """The blocks a step attending over n_ctx positions reads: those holding them, at least two
    (see the module's docstring)."""
    return max(2, -(-n_ctx // block_size))


def slot_rows(block_table: list[int], start: int, n: int, block_size: int) -> list[int]:
    """The cache rows (slot_mapping) of positions start .. start + n - 1 of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]


def table_row(block_table: list[int], width: int, scratch: int) -> list[int]:
    """A sequence's block table padded with the scratch block to the model's table width."""
    return block_table + [scratch] * (width - len(block_table))
