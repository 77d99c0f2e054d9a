"""`afd` command line: generate, chat, serve, launch, ffn, bench, console."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from afd_compile.errors import AfdError
from afd_compile.topology import parse_role


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


def _engine_args(p: argparse.ArgumentParser) -> None:
    # default None (the shipped model, filled in by _check_early): parsing imports no torch, so a
    # bad flag is answered at once
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped demo model, "
                                                 "models/afd-demo-moe)")
    p.add_argument("--enforce-eager", action="store_true", help="run without torch.compile, as in vLLM")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: min(model, 2048))")
    p.add_argument("--max-num-seqs", type=int, default=16, help="KV cache slots: most sequences at once")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default: cuda when this torch has a GPU, else cpu), cpu, or cuda: compiled decode "
                        "replayed as CUDA graphs")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="DEBUG, INFO (default: start-up stages, compiles, request lines), WARNING, ERROR")


def _sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
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


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed")


def _sampling_argv(args) -> list[str]:
    """The sampling flags of this invocation, to pass on to child ranks."""
    out = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SAMPLING_FLAGS
           if getattr(args, name) is not None]
    return out + [f"--stop={s}" for s in args.stop] + (["--ignore-eos"] if args.ignore_eos else [])


def _deployment_options(args) -> list[str]:
    """This invocation's engine and AFD flags, the same on every rank it starts (RankSpec.options)."""
    out = ["--model", str(args.model), "--micro-batches", str(args.micro_batches), "--connector", args.connector,
           "--connector-timeout", str(args.connector_timeout), "--ep-dispatch", args.ep_dispatch,
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--log-level", args.log_level]
    if args.max_model_len is not None:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager:
        out.append("--enforce-eager")
    if args.connector_delay_us:
        out += ["--connector-delay-us", str(args.connector_delay_us)]
    return out


def _afd_args(p: argparse.ArgumentParser, with_role: bool) -> None:
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


def _apply_additional_config(args) -> None:
    if not getattr(args, "additional_config", None):
        return
    try:
        extra = json.loads(args.additional_config)
    except json.JSONDecodeError as e:
        raise AfdError(f"--additional-config is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise AfdError("--additional-config must be a JSON object, e.g. {\"role\": \"ffn\", \"afd_size\": \"2A2F\"}")
    unknown = set(extra) - {"role", "afd_size", "rank", "micro_batches"}
    if unknown:
        raise AfdError(f"--additional-config: unknown keys {sorted(unknown)}; accepted: role, afd_size, rank, "
                       "micro_batches")
    for key, value in extra.items():
        setattr(args, key, value)


def _afd_config(args, role: str, rank: int):
    from afd_compile.config import AFDConfig
    from afd_compile.roles.store import SECRET_ENV

    if getattr(args, "dist_secret", None) is not None:  # the environment carries it to this rank's processes
        os.environ[SECRET_ENV] = args.dist_secret

    return AFDConfig(afd_size=args.afd_size, role=role, rank=rank, micro_batches=args.micro_batches,
                     connector=args.connector, timeout_s=args.connector_timeout, ep_dispatch=args.ep_dispatch,
                     trace=args.trace, connector_delay_us=args.connector_delay_us)


def _sampling_params(args):
    from afd_compile.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop, ignore_eos=args.ignore_eos)


def _engine_config(args):
    from afd_compile.config import EngineConfig

    return EngineConfig(model=args.model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, dtype=args.dtype, device=args.device)


def _engine(args):
    from afd_compile.engine import LLMEngine

    return LLMEngine(_engine_config(args))


def cmd_generate(args) -> None:
    params = _sampling_params(args)
    if args.afd_size is not None:
        if args.role is None:
            from afd_compile.roles.generate import launch_generate

            _afd_config(args, "attention", 0)  # validate before starting anything
            extra = [*_sampling_argv(args), *(["--chat"] if args.chat else []), "--", *args.prompt]
            texts = launch_generate(args.afd_size, _deployment_options(args), extra, len(args.prompt), args.trace,
                                    relay_logs=args.log_level in ("DEBUG", "INFO"))
            for text in texts:
                print(text.strip() if args.chat else text, flush=True)
            return
        if parse_role(args.role) != "attention":
            raise AfdError("afd generate runs attention ranks; start FFN ranks with `afd ffn`")
        from afd_compile.roles.generate import attention_rank_generate

        afd = _afd_config(args, "attention", args.rank or 0)
        attention_rank_generate(_engine_config(args), afd, args.prompt, params, args.chat)
        return
    engine = _engine(args)
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    for completion in engine.generate(prompts, params):
        print(completion.text.strip() if args.chat else completion.text, flush=True)


CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this"


def cmd_chat(args) -> None:
    from afd_compile.model.loader import single_turn

    params = _sampling_params(args)
    one_turn = single_turn(args.model) if args.single_turn is None else args.single_turn
    engine = _engine(args)
    messages = []
    hold = max((len(s) for s in params.stop), default=1) - 1
    print(f"afd chat{' (single-turn: each message alone)' if one_turn else ''}: {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line.startswith("/"):  # a command, never sent to the model
            if line == "/exit":
                break
            if line == "/reset":
                messages.clear()
                print("(conversation cleared)", file=sys.stderr)
            else:
                print(CHAT_HELP if line == "/help" else f"unknown command {line}: {CHAT_HELP}", file=sys.stderr)
            continue
        if not line:
            continue
        if one_turn:
            messages.clear()
        messages.append({"role": "user", "content": line})
        try:
            seq = engine.add_request(engine.encode_chat(messages), params)
        except AfdError as e:  # e.g. the conversation outgrew the context: report and keep chatting
            print(f"error: {e}", file=sys.stderr)
            messages.clear()
            continue
        shown = ""
        while not seq.finished:
            engine.step()
            # Hold back the tail a stop string could still start in (as vLLM's detokenizer does):
            # a match would cut it from the text after it was printed.
            visible = seq.output_text if seq.finished else seq.output_text[: len(seq.output_text) - hold]
            print(visible[len(shown):], end="", flush=True)
            shown = visible
        print()
        messages.append({"role": "assistant", "content": seq.output_text.strip()})


def cmd_ffn(args) -> None:
    if args.afd_size is None:
        raise AfdError("afd ffn needs --afd-size xAyF (or --additional-config '{\"afd_size\": \"2A2F\"}')")
    if getattr(args, "role", None) not in (None, "ffn"):
        raise AfdError(f"afd ffn runs FFN ranks, but role {args.role!r} was given")
    from afd_compile.roles.worker import run_ffn

    if args.rank is not None:
        run_ffn(_engine_config(args), _afd_config(args, "ffn", args.rank))
        return
    _supervise(args, roles=("ffn",))


def _restart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-restarts", type=int, default=3,
                   help="ranks started here: how often in a row a failed one is started again (as torchrun's; "
                        "default 3); a rank that ran 10 minutes before failing starts a fresh count")


def _server_args(p: argparse.ArgumentParser) -> None:
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
    _restart_args(p)


def _check_server_args(args) -> None:
    if not args.timeout_graceful_shutdown >= 0:
        raise AfdError(f"--timeout-graceful-shutdown must be 0 or more seconds, got {args.timeout_graceful_shutdown}")


def cmd_serve(args) -> None:
    _check_server_args(args)
    from afd_compile.serve.server import serve

    if args.afd_size is None:
        serve(_engine_config(args), None, args.host, args.port, args.api_key, args.served_model_name, args.log_level,
              args.console, args.warmup, args.timeout_graceful_shutdown)
        return
    if args.role is not None and parse_role(args.role) != "attention":
        raise AfdError("afd serve runs attention ranks; start FFN ranks with `afd ffn`")
    if args.rank is not None:
        serve(_engine_config(args), _afd_config(args, "attention", args.rank), args.host, args.port, args.api_key,
              args.served_model_name, args.log_level, args.console, args.warmup, args.timeout_graceful_shutdown)
        return
    _supervise(args, roles=("attention",))


def cmd_launch(args) -> None:
    _check_server_args(args)
    if args.afd_size is None:
        raise AfdError("afd launch needs --afd-size xAyF")
    _supervise(args, roles=("ffn", "attention"))


def _server_argv(args) -> list[str]:
    """The API flags of this invocation, for the attention ranks it starts."""
    argv = ["--host", args.host, "--port", str(args.port)] + (["--console"] if args.console else [])
    argv += ([] if args.warmup else ["--no-warmup"]) + ["--timeout-graceful-shutdown", str(args.timeout_graceful_shutdown)]
    return argv + (["--served-model-name", args.served_model_name] if args.served_model_name else [])


RANK_EXIT_S = 15  # a server's exit after its graceful shutdown: closing the engine core, leaving the world


def _supervise(args, roles: tuple[str, ...]) -> None:
    """Starts every rank of the given roles on this host and supervises them until Ctrl-C."""
    from afd_compile.roles.launcher import Supervisor
    from afd_compile.roles.rank_spec import deployment, trace_parts
    from afd_compile.roles.rendezvous import local_launch_env

    topo = _afd_config(args, "attention", 0).topology
    if args.max_restarts < 0:
        raise AfdError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    env = local_launch_env()
    serving = "attention" in roles
    if serving and args.api_key:
        env["AFD_API_KEY"] = args.api_key  # through the environment, not the process list
    sup = Supervisor(env, max_restarts=args.max_restarts)
    for rank in deployment(str(topo), _deployment_options(args), attention_extra=_server_argv(args) if serving else (),
                           trace=args.trace, roles=roles):
        sup.start(rank.name, rank.argv())
    where = f"; attention rank i serves http://{args.host}:{args.port}+i" if serving else ""
    print(f"afd: {topo} starting {' and '.join(roles)} ranks{where}  (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        sup.wait()
    except KeyboardInterrupt:
        from afd_compile.roles.ffn import STOP_GRACE_S

        # Attention ranks first: their servers finish (or end) their streams, then say goodbye
        # to the FFN ranks, which exit once all their peers have left.
        grace = getattr(args, "timeout_graceful_shutdown", 0.0)
        ranks = {role: [c.name for c in sup.children if c.name.startswith(role)] for role in ("attention", "ffn")}
        if ranks["attention"]:
            print(f"afd: stopping: attention ranks finish their requests (at most {grace:.0f} s), then FFN ranks",
                  file=sys.stderr, flush=True)
        sup.stop([(ranks["attention"], grace + RANK_EXIT_S), (ranks["ffn"], STOP_GRACE_S)])
    finally:
        if args.trace:
            from afd_compile.trace import merge

            existing = [p for p in trace_parts(str(topo), args.trace, roles) if os.path.exists(p)]
            if existing:
                merge(existing, args.trace)


def cmd_bench(args) -> None:
    from benchmarks import run_scenario

    run_scenario(args)


def cmd_plan(args) -> None:
    from afd_compile.planner import Profile, plan
    from benchmarks.report import format_table

    if args.cores is None:
        args.cores = len(os.sched_getaffinity(0))
    rows = plan(Profile.load(args.profile), args.batch_size, args.cores, args.max_micro_batches,
                args.connector_delay_us * 1e-6)
    print(f"decode batch {args.batch_size} on {args.cores} cores, one rank per core (predicted by the cost model)")
    print(format_table(["topology", "m", "ms/step", "tok/s"],
                       [[r["afd_size"], r["micro_batches"], r["step_ms"], r["tokens_per_s"]] for r in rows[:args.top]]))
    best = rows[0]
    print(f"recommended: --afd-size {best['afd_size']} --micro-batches {best['micro_batches']} "
          f"({best['tokens_per_s']:.0f} tok/s predicted)")


def cmd_console(args) -> None:
    from console.app import main as console_main

    console_main(args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="afd", description="Attention-FFN disaggregated MoE inference")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete prompts and print only the completions, one per line")
    _engine_args(p)
    _sampling_args(p, default_max_tokens=32)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    _afd_args(p, with_role=True)
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ffn", help="start FFN ranks (all of --afd-size here, or only --rank)")
    _engine_args(p)
    _afd_args(p, with_role=False)
    _restart_args(p)
    p.set_defaults(func=cmd_ffn)

    p = sub.add_parser("chat", help="interactive chat with the model (/reset, /exit, /help)")
    _engine_args(p)
    _sampling_args(p, default_max_tokens=64)
    p.add_argument("--single-turn", action=argparse.BooleanOptionalAction, default=None,
                   help="send each message without the earlier turns (default: what the model's "
                        "generation_config.json says in afd_single_turn; on for the demo model)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible server (monolithic, or the attention ranks of --afd-size)")
    _engine_args(p)
    _afd_args(p, with_role=True)
    _server_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("launch", help="start the FFN and attention ranks of --afd-size on this host and supervise them")
    _engine_args(p)
    _afd_args(p, with_role=False)
    _server_args(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("bench", help="run a benchmark scenario (results under ~/.cache/afd-compile/bench/)")
    _engine_args(p)
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
    p.add_argument("--max-tokens", type=int, default=16, help="serve: tokens per request")
    p.add_argument("--micro-batches", type=int, default=2, help="serve: AFD ping-pong micro-batches")
    p.add_argument("--connector", default="shm", help="serve: AFD connector")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="predict step time and throughput of each xAyF and m from a measured profile")
    p.add_argument("--profile", required=True, help="profile JSON written by `afd bench --scenario afd`")
    p.add_argument("--batch-size", type=int, default=32, help="decode batch over all attention ranks")
    p.add_argument("--cores", type=int, default=None, help="cores to place ranks on (default: this machine's)")
    p.add_argument("--max-micro-batches", type=int, default=6)
    p.add_argument("--connector-delay-us", type=float, default=0.0, help="extra one-way link delay to assume")
    p.add_argument("--top", type=int, default=12, help="rows to print")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("console", help="web console (Gradio): launch ranks, chat, traces, benchmarks")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=port, default=7860)
    p.set_defaults(func=cmd_console)
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


def _check_early(args) -> None:
    """What can be checked without the model, checked before anything loads or starts: the
    engine's options (--additional-config applied, `afd serve DIR` taken as --model), the model
    directory, the ports to serve on."""
    from afd_compile.config import DEFAULT_MODEL
    from afd_compile.model.loader import load_config

    if hasattr(args, "model") and hasattr(args, "dtype"):
        _apply_additional_config(args)
        if getattr(args, "model_tag", None):
            args.model = args.model_tag
        if args.model is None:
            args.model = str(DEFAULT_MODEL)
        args.device = _engine_config(args).device  # auto resolved once, for this process and its ranks
        load_config(args.model)
    if args.command in ("serve", "launch", "console"):
        from afd_compile.serve.server import check_port_free

        if args.command == "console" or getattr(args, "afd_size", None) is None:
            attention_ranks = [0]
        else:
            topo = _afd_config(args, "attention", 0).topology
            # a rank started alone (--rank i) serves port + i only
            attention_ranks = range(topo.num_attention) if getattr(args, "rank", None) is None else [args.rank]
        for i in attention_ranks:
            if args.port + i > 65535:
                raise AfdError(f"attention rank {i} would serve on port {args.port + i}: --port {args.port} "
                               f"leaves no room for {len(attention_ranks)} ranks (ports 1..65535)")
            check_port_free(args.host, args.port + i)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(normalize_flags(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from afd_compile.compile_cache import use_compile_cache

    use_compile_cache()  # before anything compiles; the ranks a command starts inherit it
    try:
        _check_early(args)
        args.func(args)
    except AfdError as e:
        print(f"afd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
