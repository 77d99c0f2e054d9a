"""AFD against the monolithic engine at equal cores, ping-pong overlap under an injected link
delay, and the cost model (afd_compile/planner.py) against measurement. `afd bench --scenario afd`.

- Equal cores: the monolithic engine runs on two cores (two torch threads); 1A1F runs its
  attention rank on one core and its FFN rank on the other (os.sched_setaffinity, one thread
  each). Decode tokens/s at each batch size for micro-batch counts m; same prompts, greedy,
  EOS ignored, the fastest of `repeats` runs (see monolithic.py for the method).
- Overlap: the same 1A1F with `--connector-delay-us d` on every hidden-state message. Overlap
  efficiency = step time without the delay / step time with it: 1.0 when ping-pong hides the
  link entirely. MegaScale-Infer's condition for that is m >= 2 (1 + Tc / Tf), Tc the one-way
  delay and Tf the FFN time of one micro-batch; both are in the JSON.
- Cost model: a profile is fitted from the timelines of 1A1F runs with one micro-batch (plus
  the per-micro-batch cost from m = 2), written to benchmarks/results/profile.json, and every
  measured configuration is predicted from it (in-sample where it fed the fit).

Ranks are spawned as fresh processes and each batch size is warmed up, which compiles its
graphs, before it is measured.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import traceback
from collections import defaultdict

import torch

from afd_compile.errors import AfdError
from afd_compile.planner import Profile, at, fit_line, step_time

from benchmarks.monolithic import WARMUP_TOKENS, EngineBackend, _batch_sizes, _prompts
from benchmarks.report import RESULTS_DIR, format_table, machine_info, write_json

SCENARIO = "afd"
TIMEOUT_S = 900


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise AfdError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise AfdError(f"--{name} must list integers >= 0, got {text!r}")
    return values


def _pin(cores: list[int]) -> None:
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def _engine_config(args, buckets):
    from afd_compile.config import EngineConfig

    return EngineConfig(model=args.model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                        max_num_seqs=max(buckets), batch_buckets=tuple(sorted(buckets)), dtype=args.dtype)


def _measure(backend: EngineBackend, prompts, batches, steps, repeats, traced: bool) -> dict:
    """Per batch size: step times of the fastest repeat, and (traced) the rank timelines of one more run."""
    out = {}
    for b in batches:
        backend.warm_up(prompts[:b])
        best = min((backend.measure(prompts[:b], steps) for _ in range(repeats)), key=lambda r: sum(r.step_times))
        out[b] = {"step_times": best.step_times}
        if traced:
            runner = backend.engine.runner
            backend.measure(prompts[:b], steps, on_decode=lambda: runner.record_trace(10 ** 9))
            out[b]["events"] = runner.collect_trace(60)["traceEvents"]
    return out


def _monolithic_main(queue, args, cores, prompts, batches, buckets) -> None:
    try:
        _pin(cores)
        from afd_compile.engine import LLMEngine

        backend = EngineBackend("monolithic", args, LLMEngine(_engine_config(args, buckets)))
        queue.put(("attention", _measure(backend, prompts, batches, args.steps, args.repeats, False)))
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def _rank_main(queue, role, args, afd_kwargs, port, core, prompts, batches, buckets, traced) -> None:
    try:
        _pin([core])
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from afd_compile.config import AFDConfig
        from afd_compile.roles.worker import attention_engine, leave_attention, run_ffn

        afd = AFDConfig(afd_size="1A1F", role=role, **afd_kwargs)
        cfg = _engine_config(args, buckets)
        if role == "ffn":
            run_ffn(cfg, afd)
            return
        engine, tracer = attention_engine(cfg, afd)
        try:
            result = _measure(EngineBackend("1A1F", args, engine), prompts, batches, args.steps, args.repeats, traced)
        finally:
            leave_attention(engine, tracer, afd)
        queue.put(("attention", result))
    except BaseException:
        queue.put(("error", f"{role}: {traceback.format_exc()}"))


def _deploy(args, cores, prompts, batches, m=None, delay_us=0.0, traced=False) -> dict:
    """Runs monolithic (m None) or 1A1F with m micro-batches; returns _measure's result."""
    from afd_compile.roles.rendezvous import free_port

    # Spawned, not forked: a process whose OpenMP pool has run (a test process, say) forks
    # children that hang in their first parallel region (libgomp is not fork-safe).
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mbs = [1] if m is None else [m]
    buckets = {b for b in batches} | {math.ceil(b / k) for b in batches for k in mbs}
    if m is None:
        procs = [ctx.Process(target=_monolithic_main, args=(queue, args, cores, prompts, batches, buckets))]
    else:
        afd = dict(micro_batches=m, connector=args.connector, connector_delay_us=delay_us, timeout_s=120)
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(queue, role, args, afd, port, core, prompts, batches, buckets,
                                                      traced))
                 for role, core in (("ffn", cores[1]), ("attention", cores[0]))]
    for p in procs:
        p.start()
    try:
        kind, payload = queue.get(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if kind == "error":
        raise AfdError(f"{'monolithic' if m is None else f'1A1F m={m}'} failed:\n{payload}")
    return payload


# ---- the profile
def _spans(events) -> dict:
    """Mean seconds of each (side, span name, layer) over a timeline."""
    acc = defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            acc[e["cat"], e["name"], e["args"].get("layer")].append(e["dur"] * 1e-6)
    return {k: statistics.fmean(v) for k, v in acc.items()}


def _over_layers(spans: dict, side: str, name: str) -> float:
    return statistics.fmean(v for (c, n, _), v in spans.items() if (c, n) == (side, name))


def fit_profile(traced: dict, pingpong: dict, num_layers: int) -> Profile:
    """traced: {batch: m=1 run with events}; pingpong: {batch: m=2 run} for the per-micro-batch cost."""
    rows, attn, attn_send, ffn_send, trip, rest = [], [], [], [], [], []
    ffn = [[] for _ in range(num_layers)]
    for b, run in sorted(traced.items()):
        s = _spans(run["events"])
        ta, sa = _over_layers(s, "attention", "attention"), _over_layers(s, "attention", "send")
        sf = _over_layers(s, "ffn", "send")
        waits = [s["attention", "wait", l] for l in range(num_layers)]
        tf = [s["ffn", "ffn", l] for l in range(num_layers)]
        rows.append(b)
        attn.append(ta)
        attn_send.append(sa)
        ffn_send.append(sf)
        for per_layer, t in zip(ffn, tf):
            per_layer.append(t)
        trip.append(statistics.fmean(w - f - sf for w, f in zip(waits, tf)))
        rest.append(statistics.median(run["step_times"]) - num_layers * (ta + sa) - sum(waits))
    profile = Profile(num_layers=num_layers, attention=fit_line(rows, attn), attention_send=fit_line(rows, attn_send),
                      ffn=[fit_line(rows, per_layer) for per_layer in ffn], ffn_send=fit_line(rows, ffn_send),
                      round_trip=fit_line(rows, trip), step_overhead=fit_line(rows, rest), micro_batch_overhead=0.0,
                      machine=machine_info())
    extra = [statistics.median(run["step_times"]) - step_time(profile, b, 2) for b, run in pingpong.items()]
    profile.micro_batch_overhead = statistics.fmean(extra)
    return profile


# ---- the scenario
def run(args) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise AfdError(f"the afd scenario pins each rank to its own core: needs 2 usable cores, found {len(cores)}")
    cores = cores[:2]
    batches = _batch_sizes(args.batch_sizes)
    m_values = [m for m in _ints(args.micro_batch_sweep, "micro-batch-sweep") if m >= 1]
    delays = [d for d in _ints(args.delays_us, "delays-us") if d > 0]
    overlap_batch = args.overlap_batch
    profile_batches = sorted(set(_batch_sizes(args.profile_batches)) | set(batches))
    from afd_compile.model.loader import load_config, load_tokenizer

    hf = load_config(args.model)
    if args.max_model_len is None:
        args.max_model_len = min(128, hf.max_position_embeddings)
    prompts = _prompts(load_tokenizer(args.model), max([*profile_batches, overlap_batch]))
    print(f"afd bench {SCENARIO}: {args.model}, cores {cores}, batches {batches}, m {m_values}, "
          f"delays {delays} us at batch {overlap_batch}, connector {args.connector}", flush=True)

    def tok_s(run_, b):
        return b / min(run_["step_times"])

    measured = []  # (batch, m, delay_us, seconds per step (median))

    mono = _deploy(args, cores, prompts, batches)
    print("  monolithic: " + ", ".join(f"B={b} {tok_s(mono[b], b):.0f} tok/s" for b in batches), flush=True)
    traced = _deploy(args, cores, prompts, profile_batches, m=1, traced=True)
    pingpong = _deploy(args, cores, prompts, profile_batches, m=2)
    profile = fit_profile(traced, pingpong, hf.num_hidden_layers)
    afd_runs = {1: traced, 2: pingpong}
    for m in m_values:
        if m not in afd_runs:
            afd_runs[m] = _deploy(args, cores, prompts, batches, m=m)
        print(f"  1A1F m={m}: " + ", ".join(f"B={b} {tok_s(afd_runs[m][b], b):.0f} tok/s" for b in batches),
              flush=True)
    for m in m_values:
        for b in batches:
            measured.append((b, m, 0, statistics.median(afd_runs[m][b]["step_times"])))
    overlap = []
    for d in delays:
        for m in m_values:
            delayed = _deploy(args, cores, prompts, [overlap_batch], m=m, delay_us=d)[overlap_batch]
            base = afd_runs[m].get(overlap_batch) or _deploy(args, cores, prompts, [overlap_batch], m=m)[overlap_batch]
            t0, t1 = statistics.median(base["step_times"]), statistics.median(delayed["step_times"])
            tf = statistics.fmean(at(line, overlap_batch / m) for line in profile.ffn)
            overlap.append({"delay_us": d, "micro_batches": m, "batch": overlap_batch, "step_ms": t0 * 1e3,
                            "step_ms_delayed": t1 * 1e3, "efficiency": t0 / t1, "ffn_us_per_micro_batch": tf * 1e6,
                            "megascale_condition": m >= 2 * (1 + d * 1e-6 / tf)})
            measured.append((overlap_batch, m, d, t1))
            print(f"  delay {d} us m={m}: efficiency {t0 / t1:.2f}", flush=True)

    comparison = []
    for b, m, d, t in measured:
        pred = step_time(profile, b, m, "1A1F", d * 1e-6)
        comparison.append({"batch": b, "micro_batches": m, "delay_us": d, "measured_ms": t * 1e3,
                           "predicted_ms": pred * 1e3, "error": pred / t - 1,
                           "in_sample": d == 0 and m <= 2 and b in profile_batches})
    results = []
    for b in batches:
        row = {"batch": b, "monolithic_tok_s": tok_s(mono[b], b)}
        for m in m_values:
            row[f"1A1F_m{m}_tok_s"] = tok_s(afd_runs[m][b], b)
        best = max(m_values, key=lambda m: row[f"1A1F_m{m}_tok_s"])
        row["best_m"], row["afd_vs_monolithic"] = best, row[f"1A1F_m{best}_tok_s"] / row["monolithic_tok_s"]
        results.append(row)
    result = {"scenario": SCENARIO, "machine": machine_info(),
              "config": {"model": str(args.model), "cores": cores, "connector": args.connector, "steps": args.steps,
                         "repeats": args.repeats, "enforce_eager": args.enforce_eager, "batches": batches,
                         "micro_batches": m_values, "delays_us": delays, "overlap_batch": overlap_batch,
                         "monolithic": "2 cores, 2 torch threads", "1A1F": "attention on one core, FFN on the other"},
              "results": results, "overlap": overlap, "model_vs_measured": comparison, "profile": profile.to_json()}
    print()
    print(format_table(["batch", "monolithic tok/s", *(f"1A1F m={m}" for m in m_values), "best vs mono"],
                       [[r["batch"], r["monolithic_tok_s"], *(r[f"1A1F_m{m}_tok_s"] for m in m_values),
                         f"{r['afd_vs_monolithic']:.2f}x (m={r['best_m']})"] for r in results]))
    if overlap:
        print("\noverlap efficiency (step without delay / with it), batch", overlap_batch)
        print(format_table(["delay us", *(f"m={m}" for m in m_values)],
                           [[d, *(o["efficiency"] for o in overlap if o["delay_us"] == d)] for d in delays]))
    errs = [abs(c["error"]) for c in comparison]
    print(f"\ncost model: {sum(e <= 0.15 for e in errs)}/{len(errs)} configurations within 15% "
          f"(out of sample: {sum(abs(c['error']) <= 0.15 for c in comparison if not c['in_sample'])}/"
          f"{sum(not c['in_sample'] for c in comparison)}), median |error| {statistics.median(errs):.1%}")
    path = write_json(result, SCENARIO, args.out)
    profile_path = path.with_name("profile.json") if args.out else RESULTS_DIR / "profile.json"
    write_json({"profile": profile.to_json()}, "profile", profile_path)
    _plot(result, path.with_suffix(".png"))
    print(f"wrote {path}, {path.with_suffix('.png').name} and {profile_path} (for `afd plan --profile`)")
    return result


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in result["results"]:
        line, = axes[0].plot(cfg["micro_batches"], [r[f"1A1F_m{m}_tok_s"] for m in cfg["micro_batches"]], marker="o",
                             label=f"1A1F B={r['batch']}")
        axes[0].axhline(r["monolithic_tok_s"], color=line.get_color(), linestyle="--", label=f"monolithic B={r['batch']}")
    axes[0].set(xlabel="micro-batches m", ylabel="decode tokens/s", title="2 cores: 1A1F (pinned) vs monolithic")
    axes[0].legend(fontsize=7)
    for d in cfg["delays_us"]:
        rows = [o for o in result["overlap"] if o["delay_us"] == d]
        axes[1].plot([o["micro_batches"] for o in rows], [o["efficiency"] for o in rows], marker="o", label=f"{d} us")
    axes[1].axhline(0.9, color="grey", linestyle=":")
    axes[1].set(xlabel="micro-batches m", ylabel="overlap efficiency", ylim=(0, 1.1),
                title=f"injected link delay, batch {cfg['overlap_batch']}")
    if cfg["delays_us"]:
        axes[1].legend()
    comp = result["model_vs_measured"]
    axes[2].scatter([c["measured_ms"] for c in comp], [c["predicted_ms"] for c in comp],
                    c=["tab:blue" if c["in_sample"] else "tab:orange" for c in comp])
    top = max(max(c["measured_ms"], c["predicted_ms"]) for c in comp) * 1.05
    axes[2].plot([0, top], [0, top], color="grey")
    axes[2].fill_between([0, top], [0, top * 0.85], [0, top * 1.15], color="grey", alpha=0.15)
    axes[2].set(xlabel="measured ms/step", ylabel="predicted ms/step", title="cost model (orange: out of sample)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

