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

benchmarks/deployment.py deploys the configurations and measures them interleaved.
"""

from __future__ import annotations

import os
import statistics

from afd_compile.errors import AfdError
from afd_compile.planner import at, fit_profile, step_time

from benchmarks.deployment import compare, round_tok_s
from benchmarks.monolithic import DEFAULT_BATCH_SIZES, demo_prompts, parse_batch_sizes
from benchmarks.report import format_table, machine_info, write_json

SCENARIO = "afd"


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise AfdError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise AfdError(f"--{name} must list integers >= 0, got {text!r}")
    return values


def _paired_ratio(afd: dict, mono: dict) -> tuple[float, float, float]:
    """Median, min and max over rounds of AFD tok/s / monolithic tok/s of the same round: the two
    were measured seconds apart, so the drift of a shared VM cancels better than between
    each one's fastest round."""
    ratios = sorted(a / m for a, m in zip(afd["round_tok_s"], mono["round_tok_s"]))
    return statistics.median(ratios), ratios[0], ratios[-1]


INSTRUMENT_US = 1e-3  # the overlap baseline: the delay connector in place, holding each message 1 ns


def run(args) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise AfdError(f"the afd scenario pins each rank to its own core: needs 2 usable cores, found {len(cores)}")
    cores = cores[:2]
    batches = parse_batch_sizes(args.batch_sizes or DEFAULT_BATCH_SIZES)
    m_values = [m for m in _ints(args.micro_batch_sweep, "micro-batch-sweep") if m >= 1]
    delays = [d for d in _ints(args.delays_us, "delays-us") if d > 0]
    overlap_batch = args.overlap_batch
    profile_batches = sorted(set(parse_batch_sizes(args.profile_batches)) | set(batches))
    from afd_compile.model.loader import load_config, load_tokenizer

    hf = load_config(args.model)
    if args.max_model_len is None:
        args.max_model_len = min(128, hf.max_position_embeddings)
    prompts = demo_prompts(load_tokenizer(args.model), max([*profile_batches, overlap_batch]))
    print(f"afd bench {SCENARIO}: {args.model}, cores {cores}, batches {batches}, m {m_values}, "
          f"delays {delays} us at batch {overlap_batch}, connector {args.connector}", flush=True)

    def tok_s(run_, b):
        return round_tok_s(run_["step_times"], b)

    measured = []  # (batch, m, delay_us, seconds per step (median))
    # m = 1 (traced) and m = 2 at the profile's batch sizes feed the cost model
    configs = {"monolithic": (batches, None, 0.0)}
    configs |= {m: (profile_batches if m in (1, 2) else batches, m, 0.0) for m in sorted({1, 2, *m_values})}
    runs = compare(args, cores, prompts, configs, traced={1})
    mono = runs.pop("monolithic")
    print("  monolithic: " + ", ".join(f"B={b} {tok_s(mono[b], b):.0f} tok/s" for b in batches), flush=True)
    profile = fit_profile(runs[1], runs[2], hf.num_hidden_layers, machine_info())
    afd_runs = runs
    for m in m_values:
        print(f"  1A1F m={m}: " + ", ".join(f"B={b} {tok_s(afd_runs[m][b], b):.0f} tok/s" for b in batches),
              flush=True)
        for b in batches:
            measured.append((b, m, 0, statistics.median(afd_runs[m][b]["step_times"])))
    overlap = []
    for m in m_values:  # each m: plain, the instrument alone, and each delay, interleaved
        cmp = compare(args, cores, prompts, {d: ([overlap_batch], m, d) for d in [0, INSTRUMENT_US, *delays]})
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

