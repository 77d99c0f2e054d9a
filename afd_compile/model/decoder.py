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
from afd_compile.model.kv_cache import MLAKVCache
from afd_compile.model.layers import Linear, RMSNorm
from afd_compile.model.rope import rope_tables

PARTS = ("all", "attention", "ffn")


def padded_batch(seqs: list[list[int]], scratch: int):
    """Whole sequences as one right-padded forward from position 0: tokens, positions and write
    slots [B, L] (row i in KV slot i, padding in the scratch slot), read slots [B] and L."""
    B, L = len(seqs), max(map(len, seqs))
    tokens = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, L, dtype=torch.long)
    write_slots = torch.full((B, L), scratch, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
        positions[i, :len(s)] = torch.arange(len(s))
        write_slots[i, :len(s)] = i
    return tokens, positions, write_slots, torch.arange(B), L


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

    def setup_caches(self, slots: int, max_seq: int) -> None:
        """Allocates the KV caches and rope tables (after weights are loaded, so not on meta)."""
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        cos, sin = rope_tables(self.cfg, max_seq)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        for half in self.attention_halves:
            half.self_attn.kv_cache = MLAKVCache(
                slots, max_seq, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim, dtype).to(device)

    @property
    def scratch_slot(self) -> int:
        return self.attention_halves[0].self_attn.kv_cache.scratch_slot

    def attention_inputs(self, positions, write_slots, read_slots, n_ctx: int) -> AttentionInputs:
        return AttentionInputs(positions, write_slots, read_slots,
                               self.rope_cos[positions], self.rope_sin[positions], n_ctx)

    def logits(self, h: torch.Tensor, last_idx: torch.Tensor) -> torch.Tensor:
        """h [B, L, hidden], last_idx [B] -> fp32 logits of each row's token last_idx, [B, vocab]."""
        h = h[torch.arange(h.shape[0], device=h.device), last_idx]
        return self.lm_head(self.norm(h)).float()

    def forward(self, tokens, positions, write_slots, read_slots, last_idx, n_ctx: int) -> torch.Tensor:
        """Monolithic forward over a right-padded batch [B, L]; returns [B, vocab] logits."""
        inp = self.attention_inputs(positions, write_slots, read_slots, n_ctx)
        h = self.embed_tokens(tokens)
        for attention_half, ffn_half in zip(self.attention_halves, self.ffn_halves):
            h = ffn_half(attention_half(h, inp))
        return self.logits(h, last_idx)
