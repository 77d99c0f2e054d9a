"""AFD against the monolithic engine at equal cores, ping-pong overlap under an injected link
delay, and the cost model (afd_compile/planner.py) against measurement. `afd bench --scenario afd`.

- Equal cores: the monolithic engine runs on two cores (two torch threads); 1A1F runs its
  attention rank on one core and its FFN rank on the other (os.sched_setaffinity, one thread
  each). Decode tokens/s at each batch size for micro-batch counts m; same prompts, greedy,
  EOS ignored, the fastest of `repeats` rounds (see monolithic.py for the method). AFD vs
  monolithic is the median over rounds of the ratio of the two within a round (with its range):
  on this VM a configuration's speed drifts by tens of percent between minutes, so ratios of
  each one's fastest round mislead.
- Overlap: the same 1A1F with `--connector-delay-us d` on every hidden-state message. Overlap
  efficiency = step time with the delay connector holding messages 1 ns / step time with it
  holding them d (paired by round likewise): 1.0 when ping-pong hides the link entirely. The
  1 ns baseline pays the instrument's own cost (its send-time stamp, a few microseconds a
  message), so the ratio measures the delay alone; the ratio to the plain 1A1F is in the JSON
  too. MegaScale-Infer's condition for that is
  m >= 2 (1 + Tc / Tf), Tc the one-way delay and Tf the FFN time of one micro-batch; both are in
  the JSON.
- Cost model: a profile is fitted from the timelines of 1A1F runs with one micro-batch (plus
  the per-micro-batch cost from m = 2), written beside the result as profile.json, and every
  measured configuration is predicted from it (in-sample where it fed the fit).

Every configuration of a comparison runs at once in its own spawned processes (see Deployment),
is warmed up at each batch size (which compiles its graphs), and then all are measured in
turn, round after round.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import statistics
import traceback
from collections import defaultdict

import torch

from afd_compile.errors import AfdError
from afd_compile.planner import Profile, at, fit_line, step_time

from benchmarks.monolithic import DEFAULT_BATCH_SIZES, EngineBackend, _batch_sizes, _prompts
from benchmarks.report import format_table, machine_info, write_json

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


class Deployment:
    """One configuration (monolithic, or 1A1F with m micro-batches and a link delay) kept running
    in its own pinned processes and measured on request. Every configuration of a comparison is
    deployed at once and they are measured in turn, round after round: this VM's speed drifts by
    tens of percent within minutes, and only interleaved runs compare configurations fairly.
    Idle deployments sleep (an idle attention rank pings its FFN rank every few seconds)."""

    def __init__(self, args, cores, prompts, batches, m=None, delay_us=0.0):
        from afd_compile.roles.rendezvous import free_port

        self.name = "monolithic" if m is None else f"1A1F m={m}" + (f" delay {delay_us:g} us" if delay_us else "")
        # Spawned, not forked: a process whose OpenMP pool has run (a test process, say) forks
        # children that hang in their first parallel region (libgomp is not fork-safe).
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        buckets = set(batches) | {math.ceil(b / (m or 1)) for b in batches}
        driver = (self.commands, self.results, args, prompts, buckets)
        if m is None:
            self.procs = [ctx.Process(target=_monolithic_main, args=(*driver, cores))]
        else:
            afd = dict(micro_batches=m, connector=args.connector, connector_delay_us=delay_us, timeout_s=120)
            port = free_port()
            self.procs = [ctx.Process(target=_rank_main, args=(*driver, role, afd, port, core))
                          for role, core in (("ffn", cores[1]), ("attention", cores[0]))]
        for p in self.procs:
            p.start()

    def request(self, batch: int, what: str = "measure") -> None:
        """what: "warm" (compile and warm this batch size), "measure" or "trace" (measure, then
        one more run recording the ranks' timelines)."""
        self.commands.put((what, batch))

    def result(self) -> dict:
        """The answer to the oldest request: {"step_times": [...], "events": [...] if traced}."""
        waited = 0.0
        while True:
            try:
                kind, payload = self.results.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if any(not p.is_alive() for p in self.procs) and self.results.empty():
                    raise AfdError(f"{self.name}: a process died without reporting") from None
                if waited > TIMEOUT_S:
                    raise AfdError(f"{self.name}: no answer for {TIMEOUT_S} s") from None
        if kind == "error":
            raise AfdError(f"{self.name} failed:\n{payload}")
        return payload

    def close(self) -> None:
        self.commands.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


IDLE_PING_S = 5.0  # an idle attention rank's heartbeat, well inside the FFN rank's connector timeout


def _drive(commands, results, backend, prompts, steps: int, idle=None) -> None:
    """A deployment's driver loop: answers requests until told to stop (None)."""
    while True:
        try:
            request = commands.get(timeout=IDLE_PING_S)
        except queue.Empty:
            if idle is not None:
                idle()
            continue
        if request is None:
            return
        what, b = request
        try:
            if what == "warm":
                backend.warm_up(prompts[:b], steps)
                results.put(("ok", {}))
                continue
            run = backend.measure(prompts[:b], steps)
            out = {"step_times": run.step_times, "outputs": run.outputs}
            if what == "trace":
                runner = backend.engine.runner
                backend.measure(prompts[:b], steps, on_decode=lambda: runner.record_trace(10 ** 9))
                out["events"] = runner.collect_trace(60)["traceEvents"]
            results.put(("ok", out))
        except BaseException:
            results.put(("error", traceback.format_exc()))
            return


def _monolithic_main(commands, results, args, prompts, buckets, cores) -> None:
    try:
        _pin(cores)
        from afd_compile.engine import LLMEngine

        backend = EngineBackend("monolithic", args, LLMEngine(_engine_config(args, buckets)))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        return
    _drive(commands, results, backend, prompts, args.steps)


def _rank_main(commands, results, args, prompts, buckets, role, afd_kwargs, port, core) -> None:
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
    except BaseException:
        results.put(("error", f"{role}: {traceback.format_exc()}"))
        return
    try:
        _drive(commands, results, EngineBackend("1A1F", args, engine), prompts, args.steps, idle=engine.runner.idle)
    finally:
        leave_attention(engine, tracer, afd)


def _interleaved(deployments: dict, batches: dict, repeats: int, traced=()) -> dict:
    """deployments {key: Deployment}, batches {key: batch sizes}. Warms every deployment at its
    batch sizes (compiling its graphs), then measures `repeats` rounds, each deployment in turn (the order rotating).
    Returns {key: {batch: the fastest round's result, plus "round_tok_s": tokens/s of every
    round in order}}; keys in `traced` also record timelines (in their last round)."""
    for key, d in deployments.items():  # one at a time: compiling everywhere at once takes longer
        for b in batches[key]:
            d.request(b, "warm")
            d.result()
    best: dict = {key: {} for key in deployments}
    keys = list(deployments)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            d = deployments[key]
            for b in batches[key]:
                d.request(b, "trace" if key in traced and r == repeats - 1 else "measure")
                out = d.result()
                kept = best[key].setdefault(b, dict(out, round_tok_s=[]))
                kept["round_tok_s"].append(_tok_s(out["step_times"], b))
                if sum(out["step_times"]) < sum(kept["step_times"]):
                    kept["step_times"] = out["step_times"]
                if "events" in out:
                    kept["events"] = out["events"]
    return best


def _tok_s(step_times: list[float], batch: int) -> float:
    """Decode tokens/s over a round (not its fastest step), as monolithic.py reports."""
    return batch * len(step_times) / sum(step_times)


def _paired_ratio(afd: dict, mono: dict) -> tuple[float, float, float]:
    """Median, min and max over rounds of AFD tok/s / monolithic tok/s of the same round: the two
    were measured seconds apart, so the drift of a shared VM cancels better than between
    each one's fastest round."""
    ratios = sorted(a / m for a, m in zip(afd["round_tok_s"], mono["round_tok_s"]))
    return statistics.median(ratios), ratios[0], ratios[-1]


def _compare(args, cores, prompts, configs: dict, traced=()) -> dict:
    """Deploys configs {key: (batches, m, delay_us)}, measures them interleaved, closes them."""
    deployments = {}
    try:
        for key, (batches, m, delay) in configs.items():
            deployments[key] = Deployment(args, cores, prompts, batches, m, delay)
        return _interleaved(deployments, {k: c[0] for k, c in configs.items()}, args.repeats, traced)
    finally:
        for d in deployments.values():
            d.close()


# ---- the profile
def _spans(events) -> dict:
    """Mean seconds of each (side, span name, layer) over a timeline."""
    acc = defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            acc[e["cat"], e["name"], e["args"].get("layer")].append(e["dur"] * 1e-6)
    return {k: statistics.fmean(v) for k, v in acc.items()}


def _over_layers(spans: dict, side: str, name: str, first: int = 0) -> float:
    return statistics.fmean(v for (c, n, layer), v in spans.items() if (c, n) == (side, name) and layer >= first)


def fit_profile(traced: dict, pingpong: dict, num_layers: int) -> Profile:
    """traced: {batch: m=1 run with events}; pingpong: {batch: m=2 run} for the per-micro-batch cost."""
    rows, attn, attn_send, ffn_send, trip, rest = [], [], [], [], [], []
    ffn = [[] for _ in range(num_layers)]
    for b, run in sorted(traced.items()):
        s = _spans(run["events"])
        # Layer 0's attention span also holds the step's entry into its compiled graph and the
        # embedding: a per-step cost (in `rest` below), not a per-layer one.
        ta, sa = _over_layers(s, "attention", "attention", first=1), _over_layers(s, "attention", "send")
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
INSTRUMENT_US = 1e-3  # the overlap baseline: the delay connector in place, holding each message 1 ns


def run(args) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise AfdError(f"the afd scenario pins each rank to its own core: needs 2 usable cores, found {len(cores)}")
    cores = cores[:2]
    batches = _batch_sizes(args.batch_sizes or DEFAULT_BATCH_SIZES)
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
        return _tok_s(run_["step_times"], b)

    measured = []  # (batch, m, delay_us, seconds per step (median))
    # m = 1 (traced) and m = 2 at the profile's batch sizes feed the cost model
    configs = {"monolithic": (batches, None, 0.0)}
    configs |= {m: (profile_batches if m in (1, 2) else batches, m, 0.0) for m in sorted({1, 2, *m_values})}
    runs = _compare(args, cores, prompts, configs, traced={1})
    mono = runs.pop("monolithic")
    print("  monolithic: " + ", ".join(f"B={b} {tok_s(mono[b], b):.0f} tok/s" for b in batches), flush=True)
    profile = fit_profile(runs[1], runs[2], hf.num_hidden_layers)
    afd_runs = runs
    for m in m_values:
        print(f"  1A1F m={m}: " + ", ".join(f"B={b} {tok_s(afd_runs[m][b], b):.0f} tok/s" for b in batches),
              flush=True)
        for b in batches:
            measured.append((b, m, 0, statistics.median(afd_runs[m][b]["step_times"])))
    overlap = []
    for m in m_values:  # each m: plain, the instrument alone, and each delay, interleaved
        cmp = _compare(args, cores, prompts, {d: ([overlap_batch], m, d) for d in [0, INSTRUMENT_US, *delays]})
        base = cmp[INSTRUMENT_US][overlap_batch]
        t0 = statistics.median(base["step_times"])
        instrument_cost = 1 / _paired_ratio(base, cmp[0][overlap_batch])[0] - 1
        for d in delays:
            t1 = statistics.median(cmp[d][overlap_batch]["step_times"])
            tf = statistics.fmean(at(line, overlap_batch / m) for line in profile.ffn)
            # step time without / with the delay = tok/s with / without it, paired round by round
            eff, lo, hi = _paired_ratio(cmp[d][overlap_batch], base)
            plain = _paired_ratio(cmp[d][overlap_batch], cmp[0][overlap_batch])[0]
            # A decode step waits the whole delay twice whatever m is: its first send (nothing
            # is in flight yet) and its last receive (the logits need it). So t0 / (t0 + 2 delay)
            # is the most a step that starts only once the previous one has ended can reach.
            bound = t0 / (t0 + 2 * d * 1e-6)
            overlap.append({"delay_us": d, "micro_batches": m, "batch": overlap_batch, "step_ms": t0 * 1e3,
                            "step_ms_delayed": t1 * 1e3, "efficiency": eff, "efficiency_range": [lo, hi],
                            "step_bound": bound, "efficiency_vs_plain": plain,
                            "instrument_cost": instrument_cost,
                            "ffn_us_per_micro_batch": tf * 1e6, "megascale_condition": m >= 2 * (1 + d * 1e-6 / tf)})
            measured.append((overlap_batch, m, d, t1))
            print(f"  delay {d} us m={m}: efficiency {eff:.2f} ({lo:.2f}-{hi:.2f} over rounds; bound {bound:.2f})",
                  flush=True)
    overlap.sort(key=lambda o: (o["delay_us"], o["micro_batches"]))
    if overlap:
        print("  the delay connector's own cost (1 ns delay vs none): "
              + ", ".join(f"m={o['micro_batches']} {o['instrument_cost']:+.0%}" for o in overlap
                          if o["delay_us"] == delays[0]), flush=True)

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
            row[f"1A1F_m{m}_paired_ratio"] = _paired_ratio(afd_runs[m][b], mono[b])
            # Greedy, EOS ignored: the same requests must give the monolithic engine's tokens.
            same = [a == o for a, o in zip(afd_runs[m][b]["outputs"], mono[b]["outputs"])]
            row[f"1A1F_m{m}_same_tokens_as_monolithic"] = sum(same) / len(same)
        best = max(m_values, key=lambda m: row[f"1A1F_m{m}_paired_ratio"][0])
        row["best_m"], row["afd_vs_monolithic"] = best, row[f"1A1F_m{best}_paired_ratio"][0]
        row["afd_vs_monolithic_range"] = row[f"1A1F_m{best}_paired_ratio"][1:]
        results.append(row)
    result = {"scenario": SCENARIO, "machine": machine_info(),
              "config": {"model": str(args.model), "cores": cores, "connector": args.connector, "steps": args.steps,
                         "repeats": args.repeats, "enforce_eager": args.enforce_eager, "batches": batches,
                         "micro_batches": m_values, "delays_us": delays, "overlap_batch": overlap_batch,
                         "monolithic": "2 cores, 2 torch threads", "1A1F": "attention on one core, FFN on the other"},
              "results": results, "overlap": overlap, "model_vs_measured": comparison, "profile": profile.to_json()}
    print()
    differ = [(r["batch"], m) for r in results for m in m_values if r[f"1A1F_m{m}_same_tokens_as_monolithic"] < 1]
    print(format_table(["batch", "monolithic tok/s", *(f"1A1F m={m}" for m in m_values), "best vs mono"],
                       [[r["batch"], r["monolithic_tok_s"], *(r[f"1A1F_m{m}_tok_s"] for m in m_values),
                         f"{r['afd_vs_monolithic']:.2f}x (m={r['best_m']})"] for r in results]))
    print("(tok/s: fastest of the rounds; best vs mono: median over rounds of the ratio within a round, range "
          + ", ".join(f"B={r['batch']} {lo:.2f}-{hi:.2f}" for r in results for lo, hi in [r["afd_vs_monolithic_range"]])
          + ")")
    print("tokens: " + ("every 1A1F run gave the monolithic engine's" if not differ else
                        "1A1F differs from monolithic at " + ", ".join(f"B={b} m={m}" for b, m in differ)))
    if overlap:
        print("\noverlap efficiency (step with a 1 ns delay / with the delay), batch", overlap_batch)
        print(format_table(["delay us", *(f"m={m}" for m in m_values)],
                           [[d, *(f"{o['efficiency']:.2f} ({o['step_bound']:.2f})" for o in overlap if o["delay_us"] == d)]
                            for d in delays]))
        print("(in brackets: t0 / (t0 + 2 delay), the bound of a step that pays the delay on its first send and "
              "last receive)")
    errs = [abs(c["error"]) for c in comparison]
    print(f"\ncost model: {sum(e <= 0.15 for e in errs)}/{len(errs)} configurations within 15% "
          f"(out of sample: {sum(abs(c['error']) <= 0.15 for c in comparison if not c['in_sample'])}/"
          f"{sum(not c['in_sample'] for c in comparison)}), median |error| {statistics.median(errs):.1%}")
    path = write_json(result, SCENARIO, args.out)
    profile_path = path.with_name("profile.json")
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
        line, = axes[1].plot([o["micro_batches"] for o in rows], [o["efficiency"] for o in rows], marker="o",
                             label=f"{d} us")
        axes[1].plot([o["micro_batches"] for o in rows], [o["step_bound"] for o in rows], color=line.get_color(),
                     linestyle="--", label=f"{d} us: step bound")
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

