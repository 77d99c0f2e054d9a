"""Shared fixtures: tiny random-weight DeepSeek-V2 checkpoints written by transformers itself,
so every test loads exactly what `save_pretrained` produces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    """In-process compiles use the CLI's cache directory too, so the servers the tests start
    find the graphs the tests compiled (and the other way round), as one user's runs would."""
    from afd_compile.compile_cache import use_compile_cache

    use_compile_cache()

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "afd-demo-moe"

TINY_BASE = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
    tie_word_embeddings=False,
    # Larger than transformers' 0.02 so logits and router scores are peaked: greedy tokens and
    # expert choices are then decided by real margins, not by float rounding.
    initializer_range=0.15,
)

TINY_VARIANTS = {
    "greedy": {},
    "group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0),
    "q_lora": dict(q_lora_rank=24),
    "dense_layers": dict(num_hidden_layers=4, first_k_dense_replace=3),
    "yarn": dict(max_position_embeddings=256, rope_scaling=dict(type="yarn", factor=4.0,
                 original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
}


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Writes a random DeepSeek-V2 checkpoint plus the demo tokenizer to `path` and returns it."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from afd_compile.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = DeepseekV2Config(**{**TINY_BASE, **overrides}, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=sorted(TINY_VARIANTS))
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    """One tiny random checkpoint per variant (greedy, group-limited, q_lora, several dense layers, yarn)."""
    return make_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), **TINY_VARIANTS[request.param])


@pytest.fixture(scope="session")
def tiny_greedy_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-greedy"))


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        pytest.fail(f"the shipped demo model is missing from {SHIPPED_MODEL}")
    return SHIPPED_MODEL
