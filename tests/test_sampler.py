"""Sampler unit tests against hand-computed distributions (no model involved).

Oracle: small distributions whose filtered sets, penalised logits and frequencies are worked
out by hand below, following vLLM's semantics (penalties on the raw logits; top_k, then top_p
on the top_k-renormalised distribution, then min_p relative to the most likely token).
"""

from __future__ import annotations

import math

import pytest
import torch

from afd_compile.engine.sampler import Sampler, apply_penalties, filter_logits
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.sequence import Sequence
from afd_compile.errors import AfdError

NEG_INF = float("-inf")

# A shuffled distribution so that the filters must map sorted positions back correctly:
# token 2 -> 0.4, token 0 -> 0.3, token 3 -> 0.2, token 1 -> 0.1.
PROBS = torch.tensor([0.3, 0.1, 0.4, 0.2])
LOGITS = PROBS.log().unsqueeze(0)  # [1, 4]; log-probs plus any constant give the same softmax


def kept(logits: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    out = filter_logits(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return set(torch.nonzero(out[0] > NEG_INF).flatten().tolist())


def seq(prompt, output=(), **params) -> Sequence:
    s = Sequence(list(prompt), SamplingParams(**params))
    s.output_token_ids = list(output)
    return s


# ---------------------------------------------------------------- filter_logits


def test_filter_off_keeps_everything():
    assert kept(LOGITS) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_k, expected", [(1, {2}), (2, {2, 0}), (3, {2, 0, 3}), (4, {0, 1, 2, 3}),
                                             (100, {0, 1, 2, 3}), (0, {0, 1, 2, 3})])
def test_top_k(top_k, expected):
    assert kept(LOGITS, top_k=top_k) == expected


@pytest.mark.parametrize("top_p, expected", [
    # exclusive cumulative mass in sorted order: 0, 0.4, 0.7, 0.9; a token survives while the
    # mass before it is below top_p (the smallest prefix whose mass reaches top_p).
    (1e-6, {2}), (0.35, {2}), (0.45, {2, 0}), (0.65, {2, 0}), (0.75, {2, 0, 3}), (0.95, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p(top_p, expected):
    assert kept(LOGITS, top_p=top_p) == expected


@pytest.mark.parametrize("min_p, expected", [
    # threshold = min_p * 0.4
    (0.2, {0, 1, 2, 3}),  # 0.08: everything
    (0.3, {2, 0, 3}),  # 0.12: drops 0.1
    (0.6, {2, 0}),  # 0.24: drops 0.2
    (0.9, {2}),  # 0.36
    (1.0, {2}),
])
def test_min_p(min_p, expected):
    assert kept(LOGITS, min_p=min_p) == expected


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # Alone, top_p=0.75 keeps three tokens (mass before the third is 0.7). After top_k=3 the
    # distribution is 0.4/0.9, 0.3/0.9, 0.2/0.9 = .444, .333, .222: the mass before the third is
    # .778 > 0.75, so only two survive.
    assert kept(LOGITS, top_p=0.75) == {2, 0, 3}
    assert kept(LOGITS, top_k=3, top_p=0.75) == {2, 0}


def test_combined_filters_intersect():
    assert kept(LOGITS, top_k=3, min_p=0.6) == {2, 0}
    assert kept(LOGITS, top_k=2, top_p=0.95, min_p=0.2) == {2, 0}
    assert kept(LOGITS, top_k=4, top_p=0.65, min_p=0.3) == {2, 0}
    assert kept(LOGITS, top_k=3, top_p=0.95, min_p=0.3) == {2, 0, 3}


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0),
                                    dict(top_k=1, top_p=1e-9, min_p=1.0)])
def test_top_token_always_kept(kwargs):
    # Extremely peaked: softmax underflows every other token to exactly 0.
    logits = torch.tensor([[0.0, 0.0, 1000.0, 0.0, -5.0]])
    assert kept(logits, **kwargs) == {2}
    # And on a flat-ish distribution the most likely token is kept whatever the filters say.
    assert 2 in kept(LOGITS, **kwargs)


def test_filter_keeps_surviving_values_and_rows_are_independent():
    logits = torch.cat([LOGITS, LOGITS + 3.0, torch.tensor([[0.5, 2.0, -1.0, 1.0]])])
    out = filter_logits(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.45, 1.0]), torch.tensor([0.0, 0.0, 0.0]))
    expect = logits.clone()
    expect[0, [1, 3]] = NEG_INF  # top_k=2
    expect[1, [1, 3]] = NEG_INF  # top_p=0.45
    # row 2: no filter
    assert torch.equal(out, expect)


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_vllm_sign_rule_over_prompt_and_output():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    s = seq(prompt=[0, 1], output=[2], repetition_penalty=2.0)
    out = apply_penalties(logits, [s])
    # seen = {0, 1, 2}: positive logits divided, negative multiplied; 3, 4, 5 untouched.
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 0.25, -0.5, 3.0, 1.0]]))
    # A penalty below 1 rewards instead.
    out = apply_penalties(logits, [seq(prompt=[0, 1], output=[2], repetition_penalty=0.5)])
    assert torch.allclose(out, torch.tensor([[4.0, -0.5, 1.0, -0.5, 3.0, 1.0]]))


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    # token 0 is only in the prompt; token 1 is generated once, token 2 twice.
    s = seq(prompt=[0, 0, 0], output=[1, 2, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [s])
    expect = torch.tensor([[2.0, -1.0 - 0.5 - 0.25, 0.5 - 0.5 - 0.5, -0.5, 3.0, 1.0]])
    assert torch.allclose(out, expect)
    # Negative values encourage repetition.
    out = apply_penalties(logits, [seq(prompt=[0], output=[1, 2, 2], presence_penalty=-1.0)])
    assert torch.allclose(out, torch.tensor([[2.0, 0.0, 1.5, -0.5, 3.0, 1.0]]))


def test_all_penalties_together_repetition_first():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    s = seq(prompt=[4], output=[1, 2, 2], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [s])
    expect = torch.tensor([[2.0, -2.0 - 0.75, 0.25 - 1.0, -0.5, 1.5, 1.0]])
    assert torch.allclose(out, expect)


def test_penalties_do_not_touch_other_rows_or_the_input():
    logits = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    before = logits.clone()
    out = apply_penalties(logits, [seq([0]), seq([0], [1], repetition_penalty=1.5, frequency_penalty=1.0)])
    assert torch.equal(logits, before)
    assert torch.equal(out[0], before[0])
    assert torch.allclose(out[1], torch.tensor([2.0 / 1.5, -1.5 - 1.0, 0.5]))
    # No penalties at all: returned unchanged.
    assert torch.equal(apply_penalties(logits, [seq([0], [1]), seq([1], [2])]), logits)


# ---------------------------------------------------------------- sampling


def test_greedy_rows_take_the_argmax_of_penalised_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    seqs = [seq([1], temperature=0.0) for _ in range(5)]
    out = Sampler(seed=0)(logits, seqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    # Filters are ignored by greedy rows; penalties are not.
    top = int(logits[0].argmax())
    penalised = seq([top], temperature=0.0, top_k=3, top_p=0.1, repetition_penalty=1e6)
    expect = apply_penalties(logits[:1], [penalised]).argmax(-1).item()
    assert expect != top
    assert Sampler(0)(logits[:1], [penalised]).token_ids == [expect]


def test_greedy_and_sampled_rows_mix():
    logits = torch.tensor([[0.0, 5.0, 1.0], [1000.0, 0.0, 0.0], [0.0, 0.0, 1000.0]])
    seqs = [seq([0], temperature=0.0), seq([0], temperature=1.0), seq([0], temperature=0.7, top_k=2)]
    assert Sampler(3)(logits, seqs).token_ids == [1, 0, 2]


def _draws(sampler: Sampler, s: Sequence, neighbours: list[Sequence], position: int, n: int = 40) -> list[int]:
    logits = torch.zeros(len(neighbours) + 1, 16)  # uniform over 16 tokens
    batch = neighbours[:position] + [s] + neighbours[position:]
    return [sampler(logits, batch).token_ids[position] for _ in range(n)]


def test_seed_gives_reproducible_samples_independent_of_batch_neighbours():
    alone = _draws(Sampler(0), seq([1], seed=1234), [], 0)
    assert len(set(alone)) > 4  # really random, not constant
    neighbours = [seq([1]), seq([2], seed=99), seq([3], top_k=5)]
    crowded = _draws(Sampler(7), seq([1], seed=1234), neighbours, 2)
    assert crowded == alone
    other_seed = _draws(Sampler(0), seq([1], seed=4321), [], 0)
    assert other_seed != alone
    # Unseeded requests follow the engine-wide generator (Sampler's seed): reproducible too.
    assert _draws(Sampler(5), seq([1]), [], 0) == _draws(Sampler(5), seq([1]), [], 0)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.5, 0), (2.0, 2)])
def test_sample_frequencies_follow_the_tempered_softmax(temperature, top_k):
    raw = torch.tensor([1.0, 0.5, 0.0, -1.0])
    n = 4000
    seqs = [seq([0], temperature=temperature, top_k=top_k) for _ in range(n)]
    out = Sampler(seed=0)(raw.expand(n, 4).contiguous(), seqs)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    expect = torch.softmax(raw.double() / temperature, -1)
    if top_k:
        expect[top_k:] = 0  # raw is sorted descending
        expect /= expect.sum()
    # std of a frequency over 4000 draws is <= 0.008: 0.035 is > 4 sigma.
    assert torch.allclose(freq, expect, atol=0.035), (freq, expect)
    if top_k:
        assert freq[top_k:].sum() == 0


def test_logprobs_are_log_softmax_of_the_raw_logits():
    torch.manual_seed(1)
    raw = torch.randn(3, 20)
    seqs = [seq([0, 1], temperature=0.0, logprobs=3, repetition_penalty=1.8),
            seq([2], temperature=0.5, top_k=4, logprobs=0, presence_penalty=1.0),
            seq([3], temperature=1.0)]
    seqs[1].output_token_ids = [5, 6]
    out = Sampler(0)(raw, seqs)
    ref = raw.log_softmax(-1)
    for i in (0, 1):
        lp = out.logprobs[i]
        assert math.isclose(lp["logprob"], ref[i, out.token_ids[i]].item(), rel_tol=1e-6, abs_tol=1e-6)
    top = ref[0].topk(3)
    assert [t for t, _ in out.logprobs[0]["top"]] == top.indices.tolist()
    assert torch.allclose(torch.tensor([v for _, v in out.logprobs[0]["top"]]), top.values)
    assert out.logprobs[1]["top"] == []
    assert out.logprobs[2] is None


# ---------------------------------------------------------------- SamplingParams validation


@pytest.mark.parametrize("name, value", [
    ("temperature", float("nan")), ("temperature", -0.1), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.5),
    ("top_k", -2), ("top_k", -100),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("nan")),
    ("presence_penalty", 2.5), ("presence_penalty", -3.0), ("presence_penalty", float("nan")),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5), ("frequency_penalty", float("inf")),
    ("max_tokens", 0), ("max_tokens", -1),
    ("logprobs", -1), ("logprobs", 21),
    ("stop", [""]),
])
def test_invalid_sampling_params_raise_naming_the_parameter(name, value):
    with pytest.raises(AfdError, match=rf"\b{name}\b"):
        SamplingParams(**{name: value})


def test_valid_edge_sampling_params():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, logprobs=0)
    SamplingParams(top_k=0, presence_penalty=-2.0, frequency_penalty=2.0, logprobs=20, repetition_penalty=0.01)
    assert SamplingParams(stop="abc").stop == ["abc"]
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(temperature=0.1).greedy
