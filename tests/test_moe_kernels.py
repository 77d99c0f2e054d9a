"""MoE kernels against a naive per-token loop.

The oracle everywhere is the most literal reading of DeepSeekMoE: for each token on its own,
softmax the router logits, (for group-limited routing) keep the best `topk_group` groups,
take the top-k experts, optionally renormalise, scale, and sum `weight * SwiGLU_e(x)`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import fused_experts, select_experts
from moe_kernels.dispatch import combine, dispatch
from moe_kernels.grouped_matmul import grouped_swiglu

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 37, 16, 12, 8, 2


# ---------------------------------------------------------------- the naive oracle

def naive_select(logits: torch.Tensor, top_k: int, method: str = "greedy", n_group: int | None = None,
                 topk_group: int | None = None, norm: bool = False, scale: float = 1.0) -> list[dict[int, float]]:
    """Per token: {expert id: routing weight}."""
    out = []
    for row in logits:
        scores = row.softmax(-1)
        allowed = list(range(len(scores)))
        if method == "group_limited_greedy":
            size = len(scores) // n_group
            group_best = [max(scores[g * size:(g + 1) * size].tolist()) for g in range(n_group)]
            groups = sorted(range(n_group), key=lambda g: -group_best[g])[:topk_group]
            allowed = [e for e in allowed if e // size in groups]
        chosen = sorted(allowed, key=lambda e: -scores[e].item())[:top_k]
        weights = {e: scores[e].item() for e in chosen}
        if norm:
            total = sum(weights.values())
            weights = {e: w / total for e, w in weights.items()}
        out.append({e: w * scale for e, w in weights.items()})
    return out


def naive_moe(x, routing: list[dict[int, float]], w13, w2, first_expert: int = 0) -> torch.Tensor:
    """Per token, per chosen expert held in w13/w2 (global ids first_expert ...): weight * SwiGLU."""
    out = torch.zeros_like(x)
    for t, chosen in enumerate(routing):
        for e, w in chosen.items():
            local = e - first_expert
            if not 0 <= local < w13.shape[0]:
                continue
            gate, up = (w13[local] @ x[t]).chunk(2)
            out[t] += w * (w2[local] @ (F.silu(gate) * up))
    return out


def as_dicts(weights: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    return [dict(zip(i.tolist(), w.tolist())) for w, i in zip(weights, ids)]


def assert_same_routing(got: list[dict[int, float]], want: list[dict[int, float]]) -> None:
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"token {t}: experts {sorted(g)} != oracle {sorted(w)}"
        for e in w:
            assert g[e] == pytest.approx(w[e], rel=1e-5, abs=1e-7), f"token {t} expert {e}"


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    logits = 3 * torch.randn(TOKENS, EXPERTS, generator=g)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / INTER ** 0.5
    return x, logits, w13, w2


# ---------------------------------------------------------------- gating

@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_greedy_selection_matches_naive_loop(data, top_k):
    """Oracle: per-token softmax then top-k; ids as a set (topk is unsorted), weights per id."""
    _, logits, _, _ = data
    weights, ids = select_experts(logits, top_k, "greedy")
    assert weights.shape == ids.shape == (TOKENS, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert_same_routing(as_dicts(weights, ids), naive_select(logits, top_k))


@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 2, 2), (4, 1, 2), (2, 1, 3), (8, 3, 3)])
def test_group_limited_selection_matches_naive_loop(data, n_group, topk_group, top_k):
    """Oracle: per token, keep the topk_group groups with the best single expert, then top-k inside."""
    _, logits, _, _ = data
    weights, ids = select_experts(logits, top_k, "group_limited_greedy", n_group, topk_group)
    assert_same_routing(as_dicts(weights, ids),
                        naive_select(logits, top_k, "group_limited_greedy", n_group, topk_group))


def test_group_limited_selection_honours_groups(data):
    """Oracle: the definition. Every chosen expert lies in one of the topk_group best groups, even
    where the unrestricted greedy choice would pick an expert outside them."""
    _, logits, _, _ = data
    n_group, topk_group, top_k = 4, 1, 2
    size = EXPERTS // n_group
    # Token 0: the two best experts overall are in different groups; group 0 holds the single best.
    logits = logits.clone()
    logits[0] = torch.tensor([9.0, 0.0, 8.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    _, ids = select_experts(logits, top_k, "group_limited_greedy", n_group, topk_group)
    _, greedy_ids = select_experts(logits, top_k, "greedy")
    assert set(greedy_ids[0].tolist()) == {0, 2}
    assert set(ids[0].tolist()) == {0, 1}
    scores = logits.softmax(-1)
    best_group = scores.view(TOKENS, n_group, size).amax(-1).argmax(-1)
    assert torch.equal(ids // size, best_group.unsqueeze(1).expand(-1, top_k))


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_norm_topk_prob_renormalises_to_scaling_factor(data, method):
    """Oracle: with norm_topk_prob each token's weights sum to routed_scaling_factor and keep the
    ratios of the unnormalised softmax scores; without it they are scores * factor."""
    _, logits, _, _ = data
    kw = dict(n_group=4, topk_group=2) if method == "group_limited_greedy" else {}
    raw_w, raw_ids = select_experts(logits, 3, method, **kw)
    w, ids = select_experts(logits, 3, method, **kw, norm_topk_prob=True, routed_scaling_factor=2.5)
    assert torch.equal(ids, raw_ids)
    torch.testing.assert_close(w.sum(-1), torch.full((TOKENS,), 2.5))
    torch.testing.assert_close(w, raw_w / raw_w.sum(-1, keepdim=True) * 2.5)
    scaled, _ = select_experts(logits, 3, method, **kw, routed_scaling_factor=2.5)
    torch.testing.assert_close(scaled, raw_w * 2.5)
    assert_same_routing(as_dicts(w, ids), naive_select(logits, 3, method, **kw, norm=True, scale=2.5))


def test_unknown_topk_method_is_rejected(data):
    """Oracle: only DeepSeek-V2's two methods exist; anything else is an error, not silent greedy."""
    with pytest.raises(ValueError, match="noaux_tc"):
        select_experts(data[1], 2, "noaux_tc")


# ---------------------------------------------------------------- dispatch / grouped matmul / combine

def test_dispatch_groups_pairs_by_expert(data):
    """Oracle: the (token, k) pairs listed expert by expert, in token order within an expert."""
    _, logits, _, _ = data
    weights, ids = select_experts(logits, TOP_K)
    plan = dispatch(ids, weights, 0, EXPERTS)
    expected = [(t, ids[t, k].item(), weights[t, k].item())
                for e in range(EXPERTS) for t in range(TOKENS) for k in range(TOP_K) if ids[t, k] == e]
    assert plan.counts == [sum(1 for p in expected if p[1] == e) for e in range(EXPERTS)]
    assert plan.token_idx.tolist() == [t for t, _, _ in expected]
    assert plan.weights.tolist() == pytest.approx([w for _, _, w in expected])


def test_dispatch_keeps_only_local_experts(data):
    """Oracle: a rank holding experts [2, 5) sees exactly the pairs routed to 2, 3, 4."""
    _, logits, _, _ = data
    weights, ids = select_experts(logits, TOP_K)
    plan = dispatch(ids, weights, 2, 3)
    assert plan.counts == [(ids == e).sum().item() for e in (2, 3, 4)]
    assert len(plan.token_idx) == sum(plan.counts)


def test_grouped_swiglu_and_combine_match_naive_loop(data):
    """Oracle: naive per-token loop; grouped_swiglu + combine are dispatch's inverse."""
    x, logits, w13, w2 = data
    weights, ids = select_experts(logits, TOP_K)
    plan = dispatch(ids, weights, 0, EXPERTS)
    expert_out = grouped_swiglu(x[plan.token_idx], plan.counts, w13, w2)
    rows = []
    for e in range(EXPERTS):
        rows += [(e, t) for t in range(TOKENS) if (ids[t] == e).any()]
    for row, (e, t) in enumerate(rows):
        gate, up = (w13[e] @ x[t]).chunk(2)
        torch.testing.assert_close(expert_out[row], w2[e] @ (F.silu(gate) * up), atol=1e-5, rtol=1e-5)
    out = combine(expert_out, plan, TOKENS)
    torch.testing.assert_close(out, naive_moe(x, as_dicts(weights, ids), w13, w2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_fused_experts_matches_naive_loop(data, method, top_k):
    """Oracle: naive per-token loop over the same routing."""
    x, logits, w13, w2 = data
    kw = dict(n_group=4, topk_group=2) if method == "group_limited_greedy" else {}
    weights, ids = select_experts(logits, top_k, method, **kw, routed_scaling_factor=1.5)
    out = fused_experts(x, weights, ids, w13, w2, 0)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, naive_moe(x, as_dicts(weights, ids), w13, w2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_slices_sum_to_full_result(data, ep_size):
    """Oracle: each rank's share equals the naive loop restricted to its experts, and the shares
    of all ranks add up to the single-rank result (what the FFN ranks' all-reduce relies on)."""
    x, logits, w13, w2 = data
    weights, ids = select_experts(logits, TOP_K)
    routing = as_dicts(weights, ids)
    full = fused_experts(x, weights, ids, w13, w2, 0)
    n_local = EXPERTS // ep_size
    total = torch.zeros_like(x)
    for rank in range(ep_size):
        first = rank * n_local
        part = fused_experts(x, weights, ids, w13[first:first + n_local], w2[first:first + n_local], first)
        torch.testing.assert_close(part, naive_moe(x, routing, w13[first:first + n_local], w2[first:first + n_local],
                                                   first), atol=1e-5, rtol=1e-5)
        total += part
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)


def test_fused_experts_with_idle_experts_and_unrouted_tokens(data):
    """Oracle: naive loop. All tokens routed to expert 5 only: the other experts see no rows, and a
    rank without expert 5 returns exact zeros."""
    x, _, w13, w2 = data
    ids = torch.full((TOKENS, 1), 5)
    weights = torch.rand(TOKENS, 1, generator=torch.Generator().manual_seed(3))
    out = fused_experts(x, weights, ids, w13, w2, 0)
    torch.testing.assert_close(out, naive_moe(x, as_dicts(weights, ids), w13, w2), atol=1e-5, rtol=1e-5)
    assert torch.equal(fused_experts(x, weights, ids, w13[:4], w2[:4], 0), torch.zeros_like(x))
    empty = fused_experts(x[:0], weights[:0], ids[:0], w13, w2, 0)
    assert empty.shape == (0, HIDDEN)


def test_fused_experts_bfloat16(data):
    """Oracle: the fp32 naive loop, within bf16 tolerance; the output keeps the input dtype."""
    x, logits, w13, w2 = data
    weights, ids = select_experts(logits, TOP_K)
    out = fused_experts(x.bfloat16(), weights, ids, w13.bfloat16(), w2.bfloat16(), 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_moe(x, as_dicts(weights, ids), w13, w2), atol=5e-2, rtol=5e-2)


def test_fused_experts_custom_op_registration(data):
    """Oracle: torch.library.opcheck (schema, fake tensor kernel, dynamo-safety)."""
    x, logits, w13, w2 = data
    weights, ids = select_experts(logits, TOP_K)
    torch.library.opcheck(fused_experts, (x, weights, ids, w13, w2, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_fused_experts_under_torch_compile_fullgraph(data):
    """Oracle: the eager result of the same function. fullgraph=True fails on any graph break,
    so the data-dependent per-expert counts must stay inside the opaque custom op."""
    x, logits, w13, w2 = data

    def moe(x, logits, w13, w2):
        weights, ids = select_experts(logits, TOP_K, "group_limited_greedy", 4, 2, True, 2.0)
        return fused_experts(x, weights, ids, w13, w2, 4)

    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, logits, w13[4:], w2[4:]), moe(x, logits, w13[4:], w2[4:]),
                               atol=1e-5, rtol=1e-5)
    # Same shapes, different routing: the op's output must follow the data, not the first trace.
    other = logits.flip(0)
    torch.testing.assert_close(compiled(x, other, w13[4:], w2[4:]), moe(x, other, w13[4:], w2[4:]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("first_expert,num_local", [(0, 8), (4, 4)])
def test_gathered_experts_equal_sort_based(first_expert, num_local, compiled):
    """Oracle: the sort-based fused_experts. One expert evaluation per (token, k) pair with static
    shapes (the compiled batch-1 path), eager and compiled, gives the same routed output, EP
    slices included."""
    from afd_compile.model.ffn_half import gathered_experts

    fn = torch.compile(gathered_experts, dynamic=False, fullgraph=True) if compiled else gathered_experts
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    w13, w2 = torch.randn(num_local, 2 * 8, 16) * 0.2, torch.randn(num_local, 16, 8) * 0.2
    weights, ids = select_experts(torch.randn(6, 8), 2)
    expected = fused_experts(x, weights, ids, w13, w2, first_expert)
    torch.testing.assert_close(fn(x, weights, ids, w13, w2, first_expert), expected, atol=1e-5, rtol=1e-5)
