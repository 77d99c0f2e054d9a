"""DeepSeek-V2 split at the AFD seam: every decoder layer is an attention half followed by an
FFN half. The monolithic model runs both; the AFD roles each run one side."""

from afd_compile.model.attention_half import AttentionHalf
from afd_compile.model.decoder import DeepseekV2
from afd_compile.model.ffn_half import FFNHalf

__all__ = ["AttentionHalf", "DeepseekV2", "FFNHalf"]
