"""DeepSeek-V2 as a stack of (attention half, FFN half) pairs.

`part` builds only what one role needs: "attention" (embeddings, attention halves, final
norm, lm_head: the attention ranks) or "ffn" (FFN halves with this expert-parallel rank's
experts: the FFN ranks); "all" is the monolithic model, whose layer is literally
`ffn_half(attention_half(h))`.
"""

from __future__ import annotations

import torch
from torch import nn

from afd_compile.model.attention_half import AttentionHalf, AttentionInputs
from afd_compile.model.ffn_half import FFNHalf
from afd_compile.model.kv_cache import MLAKVCache, context_blocks, slot_rows, table_row
from afd_compile.model.layers import Linear, RMSNorm
from afd_compile.model.rope import rope_tables

PARTS = ("all", "attention", "ffn")


def padded_batch(seqs: list[list[int]], model: DeepseekV2):
    """Whole sequences as one right-padded forward from position 0: tokens, positions and
    slot_mapping [B, L], block tables [B, W] (row i in blocks i * W' .. of the cache, W' the
    blocks the longest holds; padding in the scratch block) and L."""
    B, L = len(seqs), max(map(len, seqs))
    per_row, scratch = -(-L // model.block_size), model.scratch_block
    if B * per_row > scratch:
        raise ValueError(f"{B} sequences of {L} tokens need {B * per_row} cache blocks; the cache has {scratch}")
    tokens = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, L, dtype=torch.long)
    slot_mapping = torch.full((B, L), scratch * model.block_size, dtype=torch.long)
    tables = []
    for i, s in enumerate(seqs):
        table = list(range(i * per_row, (i + 1) * per_row))
        tokens[i, :len(s)] = torch.tensor(s)
        positions[i, :len(s)] = torch.arange(len(s))
        slot_mapping[i, :len(s)] = torch.tensor(slot_rows(table, 0, len(s), model.block_size))
        tables.append(table_row(table, model.block_table_width, scratch))
    return tokens, positions, slot_mapping, torch.tensor(tables), L


class DeepseekV2(nn.Module):
    def __init__(self, cfg, part: str = "all", ep_rank: int = 0, ep_size: int = 1, ep_dispatch: str = "sort"):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.cfg, self.part = cfg, part
        n = cfg.num_hidden_layers
        self.has_attention = part in ("all", "attention")
        self.has_ffn = part in ("all", "ffn")
        if self.has_attention:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.attention_halves = nn.ModuleList(AttentionHalf(cfg) for _ in range(n))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.has_ffn:
            self.ffn_halves = nn.ModuleList(FFNHalf(cfg, i, ep_rank, ep_size, ep_dispatch) for i in range(n))

    def setup_caches(self, num_blocks: int, block_size: int, max_seq: int) -> None:
        """Allocates the paged KV caches (num_blocks of block_size positions per layer, plus a
        scratch block) and rope tables (after weights are loaded, so not on meta)."""
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        cos, sin = rope_tables(self.cfg, max_seq)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.block_size = block_size
        # A sequence of max_seq positions plus two columns, always scratch (see kv_cache.py).
        self.block_table_width = context_blocks(max_seq, block_size) + 1
        for half in self.attention_halves:
            half.self_attn.kv_cache = MLAKVCache(
                num_blocks, block_size, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim, dtype).to(device)

    @property
    def scratch_block(self) -> int:
        return self.attention_halves[0].self_attn.kv_cache.scratch_block

    def context_blocks(self, n_ctx: int) -> int:
        """The KV blocks a forward over n_ctx positions reads per row."""
        return context_blocks(n_ctx, self.block_size)

    def attention_inputs(self, positions, slot_mapping, block_tables, num_blocks: int) -> AttentionInputs:
        return AttentionInputs(positions, slot_mapping, block_tables,
                               self.rope_cos[positions], self.rope_sin[positions], num_blocks)

    def logits(self, h: torch.Tensor, last_idx: torch.Tensor) -> torch.Tensor:
        """h [B, L, hidden], last_idx [B] -> fp32 logits of each row's token last_idx, [B, vocab]."""
        h = h[torch.arange(h.shape[0], device=h.device), last_idx]
        return self.lm_head(self.norm(h)).float()

    def forward(self, tokens, positions, slot_mapping, block_tables, last_idx, num_blocks: int) -> torch.Tensor:
        """Monolithic forward over a right-padded batch [B, L], reading num_blocks KV blocks per row
        (context_blocks(positions attended)); returns [B, vocab] logits."""
        inp = self.attention_inputs(positions, slot_mapping, block_tables, num_blocks)
        h = self.embed_tokens(tokens)
        for attention_half, ffn_half in zip(self.attention_halves, self.ffn_halves):
            h = ffn_half(attention_half(h, inp))
        return self.logits(h, last_idx)
