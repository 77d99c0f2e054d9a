"""afd-compile: Attention-FFN disaggregated inference for DeepSeek-V2 MoE models."""

__version__ = "0.1.0"
