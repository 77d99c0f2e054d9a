"""The shipped demo model: loadable by transformers' Auto classes, and it does its task."""

from __future__ import annotations

import pytest

from afd_compile.config import EngineConfig
from afd_compile.demo.tasks import CONTINUATION, held_out_set, is_held_out
from afd_compile.engine import LLMEngine, SamplingParams


def test_loads_with_transformers_auto_classes(shipped_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model)
    model = AutoModelForCausalLM.from_pretrained(shipped_model)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    cfg = model.config
    assert cfg.n_routed_experts >= 8 and cfg.n_shared_experts >= 1
    assert cfg.num_hidden_layers - cfg.first_k_dense_replace >= 2  # at least 2 MoE layers
    assert cfg.kv_lora_rank is not None  # MLA
    prompt = tok.apply_chat_template([{"role": "user", "content": "1 3 5 7 9"}], add_generation_prompt=True,
                                     tokenize=False)
    assert "1 3 5 7 9" in prompt and prompt.rstrip().endswith("<|assistant|>")


def test_seed_request_continues_the_sequence(shipped_model):
    """The seed README's chat request "1 3 5 7 9" answers "11 13 15 17 19 ..."."""
    engine = LLMEngine(EngineConfig(model=shipped_model, enforce_eager=True, max_num_seqs=4))
    prompt = engine.encode_chat([{"role": "user", "content": "1 3 5 7 9"}])
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20))
    assert out.text.strip().startswith("11 13 15 17 19")
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_held_out_sequences_exact(shipped_model, fmt):
    """Oracle: the arithmetic itself. Greedy continuations of 200 sequences whose (start, step)
    training never saw must be exactly right for at least 95% of them, as a chat turn (the next
    8 terms, then end-of-sequence) and as raw text (a /v1/completions prompt: the tokenizer's ids,
    bos first; text goes on, so its first 8 tokens, or fewer where the sequence leaves 0..999)."""
    seqs = held_out_set(200)
    assert all(is_held_out(s.start, s.step) for s in seqs)
    engine = LLMEngine(EngineConfig(model=shipped_model, enforce_eager=True, max_num_seqs=64, max_model_len=64))
    prompts = [engine.encode_chat([{"role": "user", "content": s.prompt}]) if fmt == "chat" else s.prompt
               for s in seqs]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12 if fmt == "chat" else CONTINUATION))
    exact = sum(o.text.strip() == s.answer and (o.finish_reason == "stop" or len(s.answer.split()) == CONTINUATION)
                for o, s in zip(outs, seqs))
    assert exact >= 190, f"{exact}/200 exact"


def test_raw_text_continues_the_sequence(shipped_model):
    """`afd generate "2 4 6"` and /v1/completions with prompt "2 4 6" continue it (they printed
    an empty line before the demo model was trained on raw text)."""
    engine = LLMEngine(EngineConfig(model=shipped_model, enforce_eager=True, max_num_seqs=4))
    (out,) = engine.generate(["2 4 6"], SamplingParams(temperature=0, max_tokens=16))
    assert out.text.strip() == " ".join(str(n) for n in range(8, 40, 2))
    (out,) = engine.generate(["990 993 996"], SamplingParams(temperature=0, max_tokens=16))
    assert out.text.strip() == "999" and out.finish_reason == "stop"  # the sequence leaves 0..999
