"""The `afd` argument parser: every subcommand's flags, vLLM's spellings accepted. Parsing
imports no torch, so a bad flag is answered at once."""

from __future__ import annotations

import argparse
import os


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line naming it, not the usage of fifty flags above it."""

    def error(self, message: str):
        self.exit(2, f"afd: error: {message} (`{self.prog} --help` lists the options)\n")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1..65535)")
    return value


def engine_args(p: argparse.ArgumentParser) -> None:
    # default None (the shipped model, filled in by check_early): parsing imports no torch, so a
    # bad flag is answered at once
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped demo model, "
                                                 "models/afd-demo-moe)")
    p.add_argument("--enforce-eager", action="store_true", help="run without torch.compile, as in vLLM")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: min(model, 2048))")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most sequences in a batch")
    p.add_argument("--block-size", type=int, default=16, help="KV cache positions per block (a power of two)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size in bytes (default: what --max-num-seqs sequences of --max-model-len need, "
                        "at most 10%% of the memory available)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of equal prompt prefixes between requests (default: on)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default: cuda when this torch has a GPU, else cpu), cpu, or cuda: compiled decode "
                        "replayed as CUDA graphs")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="DEBUG, INFO (default: start-up stages, compiles, request lines), WARNING, ERROR")


def sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=default_max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens tokens, past the end-of-sequence "
                                                             "token (as vLLM's ignore_eos)")


def afd_args(p: argparse.ArgumentParser, with_role: bool) -> None:
    p.add_argument("--afd-size", default=None, help="xAyF: x attention ranks, y FFN ranks (e.g. 2A2F)")
    if with_role:
        p.add_argument("--role", default=None, help="run only this role here: attention (attn) or ffn")
    p.add_argument("--rank", type=int, default=None, help="run only this rank of the role here")
    p.add_argument("--micro-batches", type=int, default=1, help="ping-pong micro-batches per step")
    p.add_argument("--connector", default="gloo",
                   help="attention<->FFN transport: gloo (any hosts), shm (ranks on one host), nccl (GPUs)")
    p.add_argument("--connector-timeout", type=float, default=60.0,
                   help="seconds any rendezvous or connector wait may take before it is an error")
    p.add_argument("--ep-dispatch", default="sort", help="FFN expert parallelism: sort or deepspeed")
    p.add_argument("--connector-delay-us", type=float, default=0.0,
                   help="inject this link delay into every hidden-state message (overlap experiments; one host)")
    p.add_argument("--trace", default=None, help="write a Chrome trace (Perfetto) of the AFD timeline here")
    p.add_argument("--dist-secret", default=None,
                   help="shared secret every rank of the deployment must hold to join its rendezvous (prefer the "
                        "environment, AFD_DIST_SECRET, which the process list does not show); ranks started by one "
                        "`afd launch` / `afd serve` / `afd ffn` share a generated one")
    p.add_argument("--additional-config", default=None,
                   help='vLLM-AFD form, e.g. \'{"role": "ffn", "afd_size": "2A2F"}\'')


def restart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-restarts", type=int, default=3,
                   help="ranks started here: how often in a row a failed one is started again (as torchrun's; "
                        "default 3); a rank that ran 10 minutes before failing starts a fresh count")


def server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, help="model directory (as in `vllm serve DIR`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=port, default=8000, help="attention rank i serves on port + i")
    p.add_argument("--api-key", default=os.environ.get("AFD_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every endpoint but /health (env AFD_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the --model path)")
    p.add_argument("--console", action="store_true",
                   help="also mount the web console at /console (local use: it can start processes)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every decode shape before /health is ready, as vLLM captures its graphs at start-up "
                        "(default; inductor's caches in ~/.cache/afd-compile/inductor make a restart fast); "
                        "--no-warmup compiles each on first use, stalling that request")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C, running requests have this long to finish (uvicorn's flag; default 30); "
                        "those still running just before it ends finish with finish_reason \"abort\"")
    restart_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="afd", description="Attention-FFN disaggregated MoE inference")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete prompts and print only the completions, one per line")
    engine_args(p)
    sampling_args(p, default_max_tokens=32)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    afd_args(p, with_role=True)
    p.add_argument("prompt", nargs="+")

    p = sub.add_parser("ffn", help="start FFN ranks (all of --afd-size here, or only --rank)")
    engine_args(p)
    afd_args(p, with_role=False)
    restart_args(p)

    p = sub.add_parser("chat", help="interactive chat with the model (/reset, /exit, /help)")
    engine_args(p)
    sampling_args(p, default_max_tokens=64)
    p.add_argument("--single-turn", action=argparse.BooleanOptionalAction, default=None,
                   help="send each message without the earlier turns (default: what the model's "
                        "generation_config.json says in afd_single_turn; on for the demo model)")

    p = sub.add_parser("serve", help="OpenAI-compatible server (monolithic, or the attention ranks of --afd-size)")
    engine_args(p)
    afd_args(p, with_role=True)
    server_args(p)

    p = sub.add_parser("launch", help="start the FFN and attention ranks of --afd-size on this host and supervise them")
    engine_args(p)
    afd_args(p, with_role=False)
    server_args(p)

    p = sub.add_parser("bench", help="run a benchmark scenario (results under ~/.cache/afd-compile/bench/)")
    engine_args(p)
    p.add_argument("--scenario", choices=["monolithic", "connector", "serve", "moe", "afd", "peers"], required=True)
    p.add_argument("--batch-sizes", default=None, help="comma-separated decode batch sizes (default 1,16,64; peers 1,16)")
    p.add_argument("--steps", type=int, default=32, help="decode steps measured per configuration")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to measure: compiled, eager, transformers (default: all three); "
                        "peers: afd-compile, transformers, vllm (default: all three)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="peers: comma-separated weight dtypes")
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements per configuration, interleaved across backends; the fastest is reported")
    p.add_argument("--out", default=None, help="JSON result path (default: ~/.cache/afd-compile/bench/<scenario>.json; "
                   "$AFD_CACHE_DIR moves it)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="monolithic: prompt tokens per request (default: the demo task's chat prompts, ~12)")
    p.add_argument("--tokens", default="1,4,16,64,256,1024,4096", help="moe: token counts per layer call")
    p.add_argument("--micro-batch-sweep", default="1,2,3,4,6", help="afd: micro-batch counts m of 1A1F")
    p.add_argument("--delays-us", default="100,300", help="afd: injected link delays of the overlap runs")
    p.add_argument("--overlap-batch", type=int, default=32, help="afd: decode batch of the overlap runs")
    p.add_argument("--profile-batches", default="4,8,16,32,64", help="afd: batch sizes the cost model is fitted on")
    p.add_argument("--deployments", default="monolithic,1A1F,2A2F", help="serve: monolithic and/or xAyF topologies")
    p.add_argument("--rates", default="1,2,4", help="serve: request rates (req/s), comma-separated")
    p.add_argument("--requests", type=int, default=24, help="serve: requests per rate")
    p.add_argument("--clients", default=None,
                   help="serve: closed loop with these numbers of concurrent clients (e.g. 16,32), each round "
                        "against the offline engine, instead of open-loop rates")
    p.add_argument("--rounds", type=int, default=3, help="serve --clients: rounds per number of clients")
    p.add_argument("--workload", choices=["shared-prefix", "mixed"], default=None,
                   help="serve: KV cache workloads instead of open-loop rates: shared-prefix (TTFT with prefix "
                        "caching against without), mixed (mixed lengths at the KV memory of --max-num-seqs "
                        "static slots: paged against a batch capped at that)")
    p.add_argument("--rate", type=float, default=4.0, help="serve --workload shared-prefix: request rate (req/s)")
    p.add_argument("--max-tokens", type=int, default=16, help="serve: tokens per request")
    p.add_argument("--micro-batches", type=int, default=2, help="serve: AFD ping-pong micro-batches")
    p.add_argument("--connector", default="shm", help="serve: AFD connector")

    p = sub.add_parser("plan", help="predict step time and throughput of each xAyF and m from a measured profile")
    p.add_argument("--profile", required=True, help="profile JSON written by `afd bench --scenario afd`")
    p.add_argument("--batch-size", type=int, default=32, help="decode batch over all attention ranks")
    p.add_argument("--cores", type=int, default=None, help="cores to place ranks on (default: this machine's)")
    p.add_argument("--max-micro-batches", type=int, default=6)
    p.add_argument("--connector-delay-us", type=float, default=0.0, help="extra one-way link delay to assume")
    p.add_argument("--top", type=int, default=12, help="rows to print")

    p = sub.add_parser("console", help="web console (Gradio): launch ranks, chat, traces, benchmarks")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=port, default=7860)
    return ap


def normalize_flags(argv: list[str]) -> list[str]:
    """Accepts vLLM's underscore spellings (--enforce_eager, --additional_config=...) too."""
    out, options = [], True
    for arg in argv:
        if arg == "--":
            options = False
        if options and arg.startswith("--") and arg != "--":
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out
