"""MoE kernels: the routed experts of one DeepSeekMoE layer, tokens 1 .. 4096, per implementation.

- sort: moe_kernels' sort-based dispatch + grouped SwiGLU matmul + index_add combine;
- stream: moe_kernels' C++ kernel streaming each touched expert's weights once (CPU);
- chosen: what `fused_experts` runs on CPU, the faster of sort and stream as measured at the
  shape on its first call;
- triton: moe_kernels/triton_moe.py, the GPU path (CUDA only);
- dense: every expert on every token, unrouted weights zero;
- loop: a per-expert loop over `where(topk_ids == e)`, as transformers' DeepseekV2Moe does;
- deepspeed: DeepSpeed-MoE's MOELayer (capacity-based dispatch, one rank; CPU only, where
  deepspeed is installed).

Every implementation gets the same input and routing (DeepSeek's greedy top-k from a random gate)
and its output is checked against a float64 reference before it is timed. Timings are the median
of `repeats` timed calls after warm-up; on CUDA each call is bracketed by synchronisation, and
the implementations without host synchronisation are also timed as CUDA-graph replays
(`*_graph`), which is how the engine's decode step runs them.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from afd_compile.errors import AfdError

from benchmarks.report import format_table, machine_info, write_json

SCENARIO = "moe"
# (hidden, moe_intermediate, routed experts, top_k): DeepSeek-V2-Lite's layer on GPU; a quarter of
# it in every dimension on CPU, so 4096 tokens stay seconds on 2 cores.
SHAPES = {"cuda": (2048, 1408, 64, 6), "cpu": (512, 352, 16, 4)}
DEFAULT_TOKENS = "1,4,16,64,256,1024,4096"
GRAPH_SAFE = ("triton", "dense")  # no host synchronisation: also timed as CUDA-graph replays


def dense_experts(x, topk_weights, topk_ids, w13, w2):
    """Every expert on every token as one batched matmul, unrouted weights zero."""
    gates = torch.zeros(x.shape[0], w13.shape[0], dtype=topk_weights.dtype, device=x.device)
    gates.scatter_add_(1, topk_ids, topk_weights)  # [tokens, experts]
    gate, up = torch.matmul(x.unsqueeze(0), w13.transpose(1, 2)).chunk(2, dim=-1)  # [experts, tokens, inter]
    y = torch.matmul(F.silu(gate) * up, w2.transpose(1, 2))  # [experts, tokens, hidden]
    return torch.einsum("te,eth->th", gates.to(y.dtype), y)


def loop_experts(x, topk_weights, topk_ids, w13, w2):
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token_idx, k = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        gate, up = (x[token_idx] @ w13[e].t()).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[e].t()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, k, None].to(y.dtype))
    return out


def reference(x, topk_weights, topk_ids, w13, w2):
    return loop_experts(x.double(), topk_weights.double(), topk_ids, w13.double(), w2.double())


def _deepspeed_impl(w13, w2, num_experts, top_k):
    """DeepSpeed's MOELayer on a one-rank gloo group, with the routing fixed by the caller."""
    import torch.distributed as dist

    from afd_compile.model.deepspeed_moe import deepspeed_layer
    from afd_compile.model.ffn_half import Experts

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)

    class Layer(torch.nn.Module):  # the attributes deepspeed_layer reads from a MoE layer
        def __init__(self):
            super().__init__()
            self.experts = Experts(*w13.shape[:1], w2.shape[1], w2.shape[2])
            self.experts.gate_up_proj.data, self.experts.down_proj.data = w13, w2
            self.cfg = type("Cfg", (), {"n_routed_experts": num_experts})
            self.routing = None

        def route(self, x):
            return self.routing

    layer = Layer()
    routed = deepspeed_layer(layer, 1, dist.group.WORLD)

    def run(x, topk_weights, topk_ids, w13_, w2_):
        layer.routing = (topk_weights, topk_ids)
        return routed(x, None)

    return run


def implementations(device: str, w13, w2, num_experts: int, top_k: int) -> dict:
    from moe_kernels.cpu_build import cpu_kernels
    from moe_kernels.cpu_moe import sort_experts, stream_experts
    from moe_kernels.fused_moe import fused_experts

    impls = {"sort": lambda *a: sort_experts(*a, 0)}
    if device == "cpu" and cpu_kernels():
        impls["stream"] = lambda *a: stream_experts(*a, 0)
        impls["chosen"] = lambda *a: fused_experts(*a, 0)  # whichever of the two measured faster
    if device == "cuda":
        from moe_kernels.triton_moe import triton_fused_experts

        impls["triton"] = lambda *a: triton_fused_experts(*a, 0)
    impls["dense"] = dense_experts
    impls["loop"] = loop_experts
    if device == "cpu":
        try:
            impls["deepspeed"] = _deepspeed_impl(w13, w2, num_experts, top_k)
        except ImportError:
            pass
    return impls


def _captured(fn, args):
    """fn(*args) captured once in a CUDA graph, as the engine's decode step runs it: replays
    cost no per-op host launches, so they show the kernels' own time."""
    fn(*args)  # compiles Triton kernels, allocates workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return lambda *_: graph.replay()


def _time(fn, args, device: str, repeats: int, budget_s: float) -> float:
    """Median seconds per call; fewer repeats where one call is slow (up to budget_s in all)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(*args)
    sync()
    times = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    import torch.distributed as dist

    had_group = dist.is_initialized()
    try:
        return _run(args)
    finally:
        # The DeepSpeed implementation needs a (one-rank) process group. None may outlive the
        # scenario: a process forked later, e.g. a test process's AFD ranks, would inherit it and hang.
        if not had_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(args) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise AfdError("--device cuda: no CUDA GPU here")
    try:
        tokens_list = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    except ValueError:
        raise AfdError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hidden, inter, num_experts, top_k = SHAPES["cuda" if device == "cuda" else "cpu"]
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(device, dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5).to(device, dtype)
    impls = implementations(device, w13, w2, num_experts, top_k)
    print(f"afd bench {SCENARIO}: {device} {args.dtype}, hidden {hidden}, intermediate {inter}, "
          f"{num_experts} experts top-{top_k}, implementations {', '.join(impls)}", flush=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    results = []
    for n in tokens_list:
        x = torch.randn(n, hidden, generator=gen).to(device, dtype)
        scores = torch.randn(n, num_experts, generator=gen).softmax(-1)
        weights, ids = (t.to(device) for t in scores.topk(top_k, dim=-1))
        ref = reference(x, weights, ids, w13, w2)
        row = {"tokens": n}
        for name, fn in impls.items():
            a = (x, weights, ids, w13, w2)
            with torch.inference_mode():
                err = (fn(*a).double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
                if err > tol:
                    raise AfdError(f"{name} at {n} tokens differs from the float64 reference by {err:.2e} "
                                   f"(relative to max |y|), more than {tol}")
                row[name + "_us"] = _time(fn, a, device, args.repeats, budget_s=2.0) * 1e6
                if name in GRAPH_SAFE and device == "cuda":
                    row[name + "_graph_us"] = _time(_captured(fn, a), a, device, args.repeats, budget_s=2.0) * 1e6
            row[name + "_rel_err"] = err
        results.append(row)
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("_us")) + f"  ({n} tokens)",
              flush=True)
    names = [k[:-3] for k in results[0] if k.endswith("_us")]
    base = next(b for b in ("triton_graph", "triton", "sort") if b in names)
    ratios = {f"{other}/{base}": {str(r["tokens"]): r[other + "_us"] / r[base + "_us"] for r in results}
              for other in names if other != base}
    result = {
        "scenario": SCENARIO, "machine": machine_info(),
        "config": {"device": device, "dtype": args.dtype, "hidden": hidden, "moe_intermediate": inter,
                   "experts": num_experts, "top_k": top_k, "tokens": tokens_list, "repeats": args.repeats,
                   "device_name": torch.cuda.get_device_name() if device == "cuda" else None},
        "results": results, "ratios_of_time": ratios,
    }
    print()
    print(format_table(["tokens", *(f"{n} us" for n in names)], [[r["tokens"], *(r[n + "_us"] for n in names)]
                                                                  for r in results]))
    for name, per in ratios.items():
        print(f"time {name}: " + ", ".join(f"{t}: {v:.2f}x" for t, v in per.items()))
    path = write_json(result, SCENARIO + ("" if device == "cpu" else f"_{device}"), args.out)
    _plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return result


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [r["tokens"] for r in result["results"]]
    for key in result["results"][0]:
        if key.endswith("_us"):
            ax.plot(tokens, [r[key] for r in result["results"]], marker="o", label=key[:-3])
    cfg = result["config"]
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="µs per layer",
           title=f"MoE layer, {cfg['experts']} experts top-{cfg['top_k']}, {cfg['device']} {cfg['dtype']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
