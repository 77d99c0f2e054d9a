"""AFD exactness: every topology and micro-batch count generates token-for-token what the
monolithic engine generates (the oracle), on a batch of prompts of different lengths."""

from __future__ import annotations

import pytest

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams
from afd_compile.model.loader import load_model
from tests.afd_harness import run_afd

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 5, 8, 10, 12, 14, 16, 6], [1, 5, 300, 310, 6], [1, 5, 70, 60, 50, 40, 30, 20, 10, 6],
           [1, 5, 999, 6], [1, 5, 4, 8, 12, 16, 20, 6]]

# The default run covers every topology, m = 1..3 and both connectors spread over them; the
# full product is marked slow.
FAST = [("1A1F", 1, "gloo"), ("1A1F", 2, "shm"), ("1A2F", 2, "gloo"), ("2A1F", 3, "shm"), ("2A2F", 2, "gloo"),
        ("2A2F", 2, "shm"), ("3A2F", 3, "shm")]
FULL = [(t, m, c) for t in ("1A1F", "1A2F", "2A1F", "2A2F", "3A2F") for m in (1, 2, 3) for c in ("gloo", "shm")]
IDS = lambda cases: [f"{t}-m{m}-{c}" for t, m, c in cases]  # noqa: E731


def monolithic_tokens(model_dir, prompts=PROMPTS) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=model_dir, enforce_eager=True, max_num_seqs=8, max_model_len=96))
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def reference_tokens():
    """model directory -> the monolithic engine's tokens (the oracle), computed once per module."""
    cache = {}

    def tokens(model_dir):
        if model_dir not in cache:
            cache[model_dir] = monolithic_tokens(model_dir)
        return cache[model_dir]

    return tokens


@pytest.fixture(scope="module")
def tiny_reference(tiny_greedy_checkpoint, reference_tokens):
    return tiny_greedy_checkpoint, reference_tokens(tiny_greedy_checkpoint)


CHECKPOINTS = {"tiny": "tiny_greedy_checkpoint", "shipped": "shipped_model"}  # fixture names
FAST_CASES = [("tiny", *c) for c in FAST] + [("shipped", "2A2F", 2, "shm")]
FULL_CASES = [(model, *c) for model in CHECKPOINTS for c in FULL]
CASE_IDS = lambda cases: [f"{model}-{t}-m{m}-{c}" for model, t, m, c in cases]  # noqa: E731


def check_matches_monolithic(request, reference_tokens, model, afd_size, m, connector):
    model_dir = request.getfixturevalue(CHECKPOINTS[model])
    out = run_afd(model_dir, afd_size, PROMPTS, GREEDY, micro_batches=m, connector=connector)
    assert out["tokens"] == reference_tokens(model_dir)


@pytest.mark.parametrize("model,afd_size,m,connector", FAST_CASES, ids=CASE_IDS(FAST_CASES))
def test_afd_matches_monolithic(request, reference_tokens, model, afd_size, m, connector):
    check_matches_monolithic(request, reference_tokens, model, afd_size, m, connector)


@pytest.mark.slow
@pytest.mark.parametrize("model,afd_size,m,connector", FULL_CASES, ids=CASE_IDS(FULL_CASES))
def test_afd_matches_monolithic_full(request, reference_tokens, model, afd_size, m, connector):
    check_matches_monolithic(request, reference_tokens, model, afd_size, m, connector)


@pytest.mark.parametrize("dispatch", ["sort", "deepspeed"])
def test_expert_parallel_dispatch_is_exact(tiny_reference, dispatch):
    """Both FFN expert-parallel dispatches (moe_kernels' sort-based all-to-all, DeepSpeed-MoE's
    MOELayer) reproduce the monolithic tokens with experts split over 2 FFN ranks."""
    model_dir, expected = tiny_reference
    assert run_afd(model_dir, "2A2F", PROMPTS, GREEDY, micro_batches=2, ep_dispatch=dispatch)["tokens"] == expected


def test_each_rank_holds_only_its_weights(tiny_reference):
    """Oracle: the full model's parameter count. Attention ranks hold no expert or FFN weight;
    each of the 2 FFN ranks holds half the routed experts and no attention or embedding."""
    model_dir, _ = tiny_reference
    counts = run_afd(model_dir, "2A2F", PROMPTS[:2], GREEDY)["params"]
    full = load_model(model_dir)
    attention = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("ffn_halves."))
    ffn = {n: p.numel() for n, p in full.named_parameters() if n.startswith("ffn_halves.")}
    routed = sum(v for n, v in ffn.items() if ".experts." in n)
    replicated = sum(ffn.values()) - routed
    assert counts[("attention", 0)] == counts[("attention", 1)] == attention
    assert counts[("ffn", 0)] == counts[("ffn", 1)] == replicated + routed // 2


@pytest.mark.parametrize("afd_size", ["1A1F", "2A1F"])
def test_compiled_afd_matches_monolithic(tiny_reference, afd_size):
    """The torch.compile'd decode of the attention ranks and of the FFN rank (one graph per
    rank per step shape: 2A1F's FFN rank sees both peers' micro-batches at once) gives the
    tokens of eager monolithic, also once the longest sequence outgrows the 64-position context
    bucket (a new attention graph mid-generation). In 1A1F the connector timeout is shorter than
    a cold compilation on 2 cores: the ranks keep each other posted while they compile. (2A1F's
    FFN rank compiles its two peers' micro-batches together on demand, within the timeout.)"""
    model_dir = tiny_reference[0]
    prompts = [*PROMPTS, [1, 5, *range(100, 156), 6]]  # 59 tokens + 12 new: past 64
    out = run_afd(model_dir, afd_size, prompts, GREEDY, micro_batches=2, enforce_eager=False, batch_buckets=(4,),
                  connector_timeout=8 if afd_size == "1A1F" else 60)
    assert out["tokens"] == monolithic_tokens(model_dir, prompts)


def test_warm_up_compiles_every_afd_step_shape_before_any_request(tiny_reference):
    """An attention rank's warm_up (`afd serve`'s default) compiles its step for every micro-batch
    split, each serving every context bucket (and the FFN rank its rounds), through the live
    links: the requests afterwards compile nothing, and their tokens are eager monolithic's."""
    model_dir = tiny_reference[0]
    prompts = [*PROMPTS, [1, 5, *range(100, 156), 6]]
    out = run_afd(model_dir, "1A1F", prompts, GREEDY, micro_batches=2, enforce_eager=False, batch_buckets=(4,),
                  warm_up=True)
    # 1..8 sequences in micro-batches of 4 rows: one or two of them (over 64 or 96 positions)
    assert out["warm"][0] == {(1, 4), (2, 4)}
    assert out["compiled"][0] == set()
    assert out["tokens"] == monolithic_tokens(model_dir, prompts)


@pytest.mark.parametrize("afd_size,m,connector", [("1A1F", 2, "shm"), ("2A1F", 3, "gloo")],
                         ids=IDS([("1A1F", 2, "shm"), ("2A1F", 3, "gloo")]))
def test_injected_link_delay_keeps_tokens(tiny_reference, afd_size, m, connector):
    """--connector-delay-us only holds messages back: the tokens are the monolithic engine's."""
    model_dir, expected = tiny_reference
    out = run_afd(model_dir, afd_size, PROMPTS, GREEDY, micro_batches=m, connector=connector, connector_delay_us=300)
    assert out["tokens"] == expected


def test_injected_link_delay_holds_each_message_back():
    """Oracle: the clock. A message sent now is handed over no sooner than the delay later, the
    stamp row is stripped, and the payload is untouched."""
    import time

    import torch

    from afd_compile.connector.delay import DelayedConnector, _stamped

    for dtype in (torch.float32, torch.bfloat16):
        conn = DelayedConnector(None, 2000, 8, dtype)
        x = torch.randn(3, 8).to(dtype)
        t0 = time.monotonic()
        y = conn._arrive(_stamped(x))
        assert time.monotonic() - t0 >= 2e-3
        assert y.dtype == dtype and torch.equal(y, x)
