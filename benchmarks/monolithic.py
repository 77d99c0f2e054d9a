"""Monolithic decode throughput: our engine compiled vs eager vs transformers' `generate`.

One process, one machine, the same prompts (chat prompts of the demo number task) and the same
greedy work for every backend: B requests, `steps` new tokens each, EOS ignored. The first new
token comes from prefill; the other `steps - 1` come from decode steps, and only those are
measured: tokens/s = B * (steps - 1) / decode wall time, ms/step = decode wall time / (steps - 1).

- compiled / eager: one LLMEngine each (torch.compile'd decode, or `enforce_eager=True`). Each
  batch size is warmed up first with a short run, which compiles its decode bucket, so
  compilation is excluded from the figures and reported separately as warm-up time. Then B
  requests are added and every `engine.step()` is timed; a step is prefill while any request
  still has uncached prompt tokens, decode afterwards.
- transformers: `DeepseekV2ForCausalLM.generate` in the same --dtype, greedy,
  `max_new_tokens = min_new_tokens = steps`, prompts left-padded, its default dynamic cache.
  Rather than subtracting a 1-token `generate` from a `steps`-token one (two noisy runs on a
  shared machine), one `generate` is timed from inside: a StoppingCriteria records a timestamp
  each time a token has been chosen. The first stamp follows prefill; the span from the first
  to the last stamp is exactly `steps - 1` full decode iterations of generate's loop (forward,
  logits processors, argmax, stopping checks), the same work an engine decode step does
  (forward, sampling, stop checks, detokenisation). It is warmed up per batch size as well.

Every backend is loaded and warmed up at every batch size first; then `repeats` rounds measure
each (batch size, backend) once, interleaved with the backend order rotating, so bursts of other
load on a shared machine hit all backends alike. The figures are those of the fastest repeat
(the least disturbed one, as timeit advises); every repeat's tokens/s is kept in the JSON.

Every engine row also carries its roofline (benchmarks/roofline.py): the bytes a decode step
must read (weights but the embedding, the routed experts its batch touched, counted; the live
KV cache) against the read bandwidth measured at the start of the same run, and the prefill's
FLOPs against a large fp32 matmul's rate. When the backends' weights do not fit in memory
together (a DeepSeek-V2-Lite-width checkpoint in fp32 is 7 GB a copy), each backend is loaded,
measured and freed in turn instead of interleaved.

Greedy outputs are compared with transformers' as a check that every backend did the same work:
the fraction of requests whose tokens up to our first EOS equal transformers' (min_new_tokens
makes generate mask EOS, while ignore_eos lets the engine pick it and go on, so the tokens after
it differ by design). Small float differences may still flip a near-tie.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from afd_compile.config import DTYPES
from afd_compile.errors import AfdError

from benchmarks.report import format_table, machine_info, write_json

SCENARIO = "monolithic"
BACKENDS = ("compiled", "eager", "transformers")
DEFAULT_MAX_MODEL_LEN = 128
DEFAULT_REPEATS = 3
DEFAULT_BATCH_SIZES = "1,16,64"
WARMUP_TOKENS = 3  # transformers: prefill + 2 decode steps, the second running what the first set up


def parse_list(text: str, name: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise AfdError(f"--{name} is empty")
    return items


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in parse_list(text, "batch-sizes")]
    except ValueError:
        raise AfdError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if min(sizes) < 1:
        raise AfdError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _backends(text: str | None) -> list[str]:
    names = parse_list(text or ",".join(BACKENDS), "backends")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise AfdError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def demo_prompts(tokenizer, n: int, length: int | None = None) -> list[list[int]]:
    """Token ids of n chat prompts of the demo task (held-out sequences), as the engine encodes them;
    with `length`, each is extended to that many tokens by repeating its numbers (prefill runs)."""
    from afd_compile.demo.tasks import held_out_set

    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": s.prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
               for s in held_out_set(n)]
    if length is None:
        return prompts
    # Keep the first token (bos) and the last (the assistant marker); repeat what is between.
    return [[p[0], *(p[1:-1] * length)[:length - 2], p[-1]] for p in prompts]


def _figures(backend: str, batch_size: int, load_s: float, warmup_s: float, runs: list[Run]) -> dict:
    """Figures of the fastest repeat (least disturbed by other load on the machine), plus every repeat's tok/s."""
    def tokens(run: Run) -> int:  # the first new token of each request came from prefill
        return sum(len(o) for o in run.outputs) - batch_size

    best = min(runs, key=lambda run: sum(run.step_times))
    decode_s = sum(best.step_times)
    return {
        "backend": backend,
        "batch_size": batch_size,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "prefill_ms": best.prefill_s * 1e3,
        "decode_s": decode_s,
        "decode_steps": len(best.step_times),
        "decode_tokens": tokens(best),
        "tokens_per_s": tokens(best) / decode_s,
        "ms_per_step": decode_s / len(best.step_times) * 1e3,
        "ms_per_step_median": statistics.median(best.step_times) * 1e3,
        "tokens_per_s_repeats": [tokens(r) / sum(r.step_times) for r in runs],
    }


def _same_until_eos(ours: list[int], theirs: list[int], eos_ids: set[int]) -> bool:
    """Whether our tokens before our first EOS are transformers' (which never picks EOS here)."""
    n = next((i for i, t in enumerate(ours) if t in eos_ids), len(ours))
    return ours[:n] == theirs[:n]


# ---- the backends: load once, warm_up(prompts) -> seconds, measure(prompts) -> Run
@dataclass
class Run:
    prefill_s: float
    step_times: list[float]  # wall time of each decode step
    outputs: list[list[int]]  # new token ids per request


class EngineBackend:
    """Our LLMEngine, torch.compile'd decode (compiled) or `enforce_eager=True` (eager); or any
    engine given, e.g. an AFD attention rank's."""

    def __init__(self, name: str, args, engine=None):
        from afd_compile.config import EngineConfig
        from afd_compile.engine import LLMEngine

        self.name = name
        self.engine = engine or LLMEngine(EngineConfig(
            model=args.model, enforce_eager=name == "eager", max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, dtype=args.dtype, device=args.device,
            enable_prefix_caching=False))  # repeated prompts: prefill measured in full, as transformers runs it

    def warm_up(self, prompts: list[list[int]], steps: int) -> float:
        """A run as long as the measured ones: compiles every (batch, context) bucket they reach."""
        t0 = time.perf_counter()
        self.measure(prompts, steps)
        return time.perf_counter() - t0

    def measure(self, prompts: list[list[int]], steps: int, on_decode=None) -> Run:
        """Adds the prompts and times every engine.step() until all finish; calls on_decode()
        before the first decode step."""
        from afd_compile.engine import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
        seqs = [self.engine.add_request(p, params) for p in prompts]
        sched = self.engine.scheduler
        prefill_s, step_times = 0.0, []
        while sched.has_work():
            is_prefill = bool(sched.waiting) or any(s.is_prefill for s in sched.running)
            if on_decode and not is_prefill and not step_times:
                on_decode()
            t0 = time.perf_counter()
            self.engine.step()
            dt = time.perf_counter() - t0
            if is_prefill:
                prefill_s += dt
            else:
                step_times.append(dt)
        return Run(prefill_s, step_times, [s.output_token_ids for s in seqs])


class TransformersBackend:
    """`DeepseekV2ForCausalLM.generate` in --dtype, greedy, left-padded prompts, timed from inside."""

    name = "transformers"

    def __init__(self, args, tokenizer):
        from transformers import DeepseekV2ForCausalLM

        self.device = args.device
        self.model = DeepseekV2ForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(self.device).eval()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def warm_up(self, prompts: list[list[int]], steps: int) -> float:
        t0 = time.perf_counter()
        self.measure(prompts, min(steps, WARMUP_TOKENS))
        return time.perf_counter() - t0

    def measure(self, prompts: list[list[int]], steps: int) -> Run:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Stamps(StoppingCriteria):
            """Records when each new token has been chosen; never stops generation."""

            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores, **kwargs):
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        width = max(map(len, prompts))  # left padding, as decoder-only generate expects
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        stamps = Stamps()
        t_start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                                      min_new_tokens=steps, pad_token_id=self.pad,
                                      stopping_criteria=StoppingCriteriaList([stamps]))
        t = stamps.times
        if len(t) != steps:
            raise AfdError(f"transformers generate produced {len(t)} tokens instead of {steps}")
        return Run(t[0] - t_start, [b - a for a, b in zip(t, t[1:])], out[:, width:].tolist())


# ---- the scenario
def _roofline(engine, prompts, run: Run, machine: dict) -> dict:
    """The row's bytes and FLOPs against the machine's measured limits (benchmarks/roofline.py)."""
    from benchmarks import roofline

    need = roofline.decode_step_bytes(engine, prompts, run.outputs)
    step_s = sum(run.step_times) / len(run.step_times)
    bw = machine["read_bandwidth"]["bytes_per_s"]
    flops = roofline.prefill_flops(engine.model, prompts)
    return {**need, "achieved_bytes_per_s": need["bytes_per_step"] / step_s,
            "roofline_fraction": need["bytes_per_step"] / bw / step_s,
            "prefill_flops": flops, "prefill_flop_per_s": flops / run.prefill_s,
            "prefill_fraction": flops / machine["matmul"]["flop_per_s"] / run.prefill_s}


def _fits_at_once(args, names: list[str]) -> bool:
    """Whether every backend's copy of the weights fits in memory together (else one at a time)."""
    from afd_compile.model.decoder import DeepseekV2
    from afd_compile.model.loader import available_memory, load_config, weights_nbytes

    with torch.device("meta"):
        model = DeepseekV2(load_config(args.model))
    need = len(names) * weights_nbytes(model, DTYPES[args.dtype])
    have = available_memory()
    return have is None or need < 0.6 * have


def run(args) -> dict:
    from afd_compile.model.loader import load_config, load_tokenizer
    from benchmarks import roofline

    batch_sizes = parse_batch_sizes(args.batch_sizes or DEFAULT_BATCH_SIZES)
    names = _backends(getattr(args, "backends", None))
    steps, repeats = args.steps, getattr(args, "repeats", DEFAULT_REPEATS)
    prompt_len = getattr(args, "prompt_len", None)
    if steps < 2:
        raise AfdError(f"--steps must be >= 2 (the first new token comes from prefill), got {steps}")
    if repeats < 1:
        raise AfdError(f"--repeats must be >= 1, got {repeats}")
    if prompt_len is not None and prompt_len < 3:
        raise AfdError(f"--prompt-len must be >= 3 (bos, a prompt token, the assistant marker), got {prompt_len}")
    hf_config = load_config(args.model)
    # The engine holds every batch at once, in a small KV cache.
    args.max_num_seqs = max(args.max_num_seqs, max(batch_sizes))
    tokenizer = load_tokenizer(args.model)
    prompts = demo_prompts(tokenizer, max(batch_sizes), prompt_len)
    longest = max(map(len, prompts))
    if args.max_model_len is None:
        args.max_model_len = min(max(DEFAULT_MAX_MODEL_LEN, longest + steps), hf_config.max_position_embeddings)
    if longest + steps > args.max_model_len:
        raise AfdError(f"the longest prompt ({longest} tokens) plus {steps} steps does not fit "
                       f"--max-model-len {args.max_model_len}")
    at_once = _fits_at_once(args, names)

    print(f"afd bench {SCENARIO}: {args.model}, batch sizes {batch_sizes}, {steps} steps, {repeats} repeats, "
          f"backends {', '.join(names)}" + ("" if at_once else " (one at a time: their weights do not fit together)"),
          flush=True)
    machine = {"read_bandwidth": roofline.read_bandwidth(), "matmul": roofline.matmul_rate()}
    print(f"  read bandwidth {machine['read_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul "
          f"{machine['matmul']['flop_per_s'] / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    load_s, warmup_s, runs, lines = {}, {}, {}, {}

    def load(name):
        t0 = time.perf_counter()
        backend = TransformersBackend(args, tokenizer) if name == "transformers" else EngineBackend(name, args)
        load_s[name] = time.perf_counter() - t0
        for b in batch_sizes:
            warmup_s[name, b] = backend.warm_up(prompts[:b], steps)
            runs[name, b] = []
        print(f"  {name}: loaded in {load_s[name]:.1f} s, warmed up in "
              f"{sum(warmup_s[name, b] for b in batch_sizes):.1f} s", flush=True)
        return backend

    def finish(name, backend):  # roofline figures need the engine's model: taken before it is freed
        if isinstance(backend, EngineBackend):
            for b in batch_sizes:
                best = min(runs[name, b], key=lambda run: sum(run.step_times))
                lines[name, b] = _roofline(backend.engine, prompts[:b], best, machine)

    if at_once:
        backends = {name: load(name) for name in names}
        # Interleaved, so a burst of other load on the machine hits every backend alike; the order
        # of the backends rotates between repeats.
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for b in batch_sizes:
                for name in order:
                    runs[name, b].append(backends[name].measure(prompts[:b], steps))
            print(f"  repeat {r + 1}/{repeats} done", flush=True)
        for name in names:
            finish(name, backends[name])
        del backends
    else:
        for name in names:
            backend = load(name)
            for r in range(repeats):
                for b in batch_sizes:
                    runs[name, b].append(backend.measure(prompts[:b], steps))
            finish(name, backend)
            del backend
            gc.collect()
    results = [{**_figures(name, b, load_s[name], warmup_s[name, b], runs[name, b]), **lines.get((name, b), {})}
               for b in batch_sizes for name in names]
    outputs = {name: {b: runs[name, b][0].outputs for b in batch_sizes} for name in names}

    eos = hf_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id} - {None}
    by = {(r["backend"], r["batch_size"]): r for r in results}
    for r in results:
        ref = by.get(("transformers", r["batch_size"]))
        r["speedup_vs_transformers"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        if "transformers" in outputs and r["backend"] != "transformers":
            ours, theirs = outputs[r["backend"]][r["batch_size"]], outputs["transformers"][r["batch_size"]]
            same = sum(_same_until_eos(a, b, eos_ids) for a, b in zip(ours, theirs))
            r["same_tokens_as_transformers"] = same / len(ours)
    ratios = {}
    for num, den in (("compiled", "transformers"), ("compiled", "eager"), ("eager", "transformers")):
        if num in names and den in names:
            ratios[f"{num}/{den}"] = {str(b): by[num, b]["tokens_per_s"] / by[den, b]["tokens_per_s"]
                                      for b in batch_sizes}

    result = {
        "scenario": SCENARIO,
        "machine": {**machine_info(), **machine},
        "config": {
            "model": str(args.model), "device": args.device, "dtype": args.dtype,
            "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs, "steps": steps,
            "decode_steps": steps - 1, "repeats": repeats, "batch_sizes": batch_sizes, "backends": names,
            "prompts": "chat prompts of afd_compile.demo.tasks.held_out_set" +
                       (f", their numbers repeated to {prompt_len} tokens" if prompt_len else "") +
                       ", greedy, EOS ignored",
            "backends_at_once": at_once,
            "prompt_tokens": [len(p) for p in prompts],
        },
        "results": results,
        "ratios": ratios,
    }
    headers = ["batch", "backend", "tok/s", "ms/step", "median ms", "prefill ms", "warm-up s", "vs transformers"]
    rows = [[r["batch_size"], r["backend"], r["tokens_per_s"], r["ms_per_step"], r["ms_per_step_median"],
             r["prefill_ms"], r["warmup_s"],
             None if r["speedup_vs_transformers"] is None else f"{r['speedup_vs_transformers']:.2f}x"]
            for r in results]
    print()
    print(format_table(headers, rows))
    print()
    print(format_table(["batch", "backend", "MB/step", "experts/layer", "GB/s", "of roofline", "prefill GFLOP/s",
                        "of matmul"],
                       [[r["batch_size"], r["backend"], r["bytes_per_step"] / 1e6, r["touched_experts_per_layer"],
                         r["achieved_bytes_per_s"] / 1e9, r["roofline_fraction"], r["prefill_flop_per_s"] / 1e9,
                         r["prefill_fraction"]] for r in results if "bytes_per_step" in r]))
    print(f"roofline: read bandwidth {machine['read_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s and fp32 matmul "
          f"{machine['matmul']['flop_per_s'] / 1e9:.0f} GFLOP/s, measured in this run")
    for name, per_batch in ratios.items():
        print(f"{name} tok/s: " + ", ".join(f"B={b} {v:.2f}x" for b, v in per_batch.items()))
    path = write_json(result, SCENARIO if args.device == "cpu" else f"{SCENARIO}_{args.device}", args.out)
    print(f"wrote {path}")
    return result
