"""The `afd` subcommands but chat: generate, ffn, serve, launch (here, or as the rank a cluster
launcher placed), bench, plan, console."""

from __future__ import annotations

import os
import sys

from afd_compile.cli.options import afd_config, check_server_args, cluster_place, deployment_options, engine_config, \
    make_engine, sampling_argv, sampling_params, server_argv
from afd_compile.errors import AfdError
from afd_compile.topology import parse_role


def _run_ffn(args, rank: int) -> None:
    from afd_compile.roles.worker import run_ffn

    run_ffn(engine_config(args), afd_config(args, "ffn", rank))


def cmd_generate(args) -> None:
    params = sampling_params(args)
    placed = cluster_place(args)
    if placed is not None and placed[0] == "ffn":
        _run_ffn(args, placed[1])
        return
    if args.afd_size is not None:
        if placed is None and args.role is None:
            from afd_compile.roles.generate import launch_generate

            afd_config(args, "attention", 0)  # validate before starting anything
            extra = [*sampling_argv(args), *(["--chat"] if args.chat else []), "--", *args.prompt]
            texts = launch_generate(args.afd_size, deployment_options(args), extra, len(args.prompt), args.trace,
                                    relay_logs=args.log_level in ("DEBUG", "INFO"))
            for text in texts:
                print(text.strip() if args.chat else text, flush=True)
            return
        if placed is None and parse_role(args.role) != "attention":
            raise AfdError("afd generate runs attention ranks; start FFN ranks with `afd ffn`")
        from afd_compile.roles.generate import attention_rank_generate

        afd = afd_config(args, "attention", placed[1] if placed else args.rank or 0)
        attention_rank_generate(engine_config(args), afd, args.prompt, params, args.chat)
        return
    engine = make_engine(args)
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    for completion in engine.generate(prompts, params):
        print(completion.text.strip() if args.chat else completion.text, flush=True)


def cmd_ffn(args) -> None:
    if args.afd_size is None:
        raise AfdError("afd ffn needs --afd-size xAyF (or --additional-config '{\"afd_size\": \"2A2F\"}')")
    if getattr(args, "role", None) not in (None, "ffn"):
        raise AfdError(f"afd ffn runs FFN ranks, but role {args.role!r} was given")
    if args.rank is not None:
        _run_ffn(args, args.rank)
        return
    _supervise(args, roles=("ffn",))


def cmd_serve(args) -> None:
    check_server_args(args)
    if args.afd_size is None:
        _serve(args, None)
        return
    if args.role is not None and parse_role(args.role) != "attention":
        raise AfdError("afd serve runs attention ranks; start FFN ranks with `afd ffn`")
    if args.rank is not None:
        _serve(args, args.rank)
        return
    _supervise(args, roles=("attention",))


def _serve(args, attention_rank: int | None) -> None:
    from afd_compile.serve.server import serve

    afd = None if attention_rank is None else afd_config(args, "attention", attention_rank)
    serve(engine_config(args), afd, args.host, args.port, args.api_key, args.served_model_name, args.log_level,
          args.console, args.warmup, args.timeout_graceful_shutdown)


def cmd_launch(args) -> None:
    """Every rank on this host under one supervisor; under torchrun or srun, this process's rank."""
    check_server_args(args)
    if args.afd_size is None:
        raise AfdError("afd launch needs --afd-size xAyF")
    placed = cluster_place(args)
    if placed is None:
        _supervise(args, roles=("ffn", "attention"))
    elif placed[0] == "ffn":
        _run_ffn(args, placed[1])
    else:
        _serve(args, placed[1])


RANK_EXIT_S = 15  # a server's exit after its graceful shutdown: closing the engine core, leaving the world


def _supervise(args, roles: tuple[str, ...]) -> None:
    """Starts every rank of the given roles on this host and supervises them until Ctrl-C."""
    from afd_compile.roles.launcher import Supervisor
    from afd_compile.roles.rank_spec import deployment, trace_parts
    from afd_compile.roles.rendezvous import local_launch_env

    topo = afd_config(args, "attention", 0).topology
    if args.max_restarts < 0:
        raise AfdError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    env = local_launch_env()
    serving = "attention" in roles
    if serving and args.api_key:
        env["AFD_API_KEY"] = args.api_key  # through the environment, not the process list
    sup = Supervisor(env, max_restarts=args.max_restarts)
    for rank in deployment(str(topo), deployment_options(args), attention_extra=server_argv(args) if serving else (),
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


COMMANDS = {"generate": cmd_generate, "ffn": cmd_ffn, "serve": cmd_serve, "launch": cmd_launch, "bench": cmd_bench,
            "plan": cmd_plan, "console": cmd_console}
