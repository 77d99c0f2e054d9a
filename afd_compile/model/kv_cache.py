"""Static MLA KV cache of one layer: the compressed latent and the rope key, not full K/V.

Preallocated to [slots + 1, max_seq + 1, ...] and written in place (as in gpt-fast). The extra
last slot is scratch: padded rows of a batch bucket read and write there and never touch a live
request's cache. The extra position is never written: it keeps every read a strict prefix, so a
decode graph compiled for a dynamic context span (compilation.context_spans) holds for every
span up to max_seq instead of needing its own graph for the whole-cache read.
"""

from __future__ import annotations

import torch
from torch import nn


class MLAKVCache(nn.Module):
    def __init__(self, slots: int, max_seq: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("latent", torch.zeros(slots + 1, max_seq + 1, kv_lora_rank, dtype=dtype), persistent=False)
        self.register_buffer("k_rope", torch.zeros(slots + 1, max_seq + 1, rope_dim, dtype=dtype), persistent=False)

    @property
    def scratch_slot(self) -> int:
        return self.latent.shape[0] - 1

    def write(self, slots: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """slots, positions [B, L]; latent [B, L, kv_lora_rank]; k_rope [B, L, rope_dim]."""
        self.latent.index_put_((slots, positions), latent)
        self.k_rope.index_put_((slots, positions), k_rope)

    def read(self, slots: torch.Tensor, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n_ctx positions of each slot: [B, n_ctx, kv_lora_rank], [B, n_ctx, rope_dim]."""
        return self.latent[slots, :n_ctx], self.k_rope[slots, :n_ctx]
