"""What an `afd` invocation means: its flags as engine, AFD and sampling configs, the flags it
passes on to the ranks it starts, and the checks made before anything loads."""

from __future__ import annotations

import json
import os

from afd_compile.errors import AfdError


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed")


def sampling_argv(args) -> list[str]:
    """The sampling flags of this invocation, to pass on to child ranks."""
    out = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SAMPLING_FLAGS
           if getattr(args, name) is not None]
    return out + [f"--stop={s}" for s in args.stop] + (["--ignore-eos"] if args.ignore_eos else [])


def deployment_options(args) -> list[str]:
    """This invocation's engine and AFD flags, the same on every rank it starts (RankSpec.options)."""
    out = ["--model", str(args.model), "--micro-batches", str(args.micro_batches), "--connector", args.connector,
           "--connector-timeout", str(args.connector_timeout), "--ep-dispatch", args.ep_dispatch,
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--log-level", args.log_level,
           "--block-size", str(args.block_size),
           "--enable-prefix-caching" if args.enable_prefix_caching else "--no-enable-prefix-caching"]
    if args.kv_cache_memory_bytes is not None:
        out += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    if args.max_model_len is not None:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager:
        out.append("--enforce-eager")
    if args.connector_delay_us:
        out += ["--connector-delay-us", str(args.connector_delay_us)]
    return out


def server_argv(args) -> list[str]:
    """The API flags of this invocation, for the attention ranks it starts."""
    argv = ["--host", args.host, "--port", str(args.port)] + (["--console"] if args.console else [])
    argv += ([] if args.warmup else ["--no-warmup"]) + ["--timeout-graceful-shutdown", str(args.timeout_graceful_shutdown)]
    return argv + (["--served-model-name", args.served_model_name] if args.served_model_name else [])


def apply_additional_config(args) -> None:
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


def afd_config(args, role: str, rank: int):
    from afd_compile.config import AFDConfig
    from afd_compile.roles.store import SECRET_ENV

    if getattr(args, "dist_secret", None) is not None:  # the environment carries it to this rank's processes
        os.environ[SECRET_ENV] = args.dist_secret

    return AFDConfig(afd_size=args.afd_size, role=role, rank=rank, micro_batches=args.micro_batches,
                     connector=args.connector, timeout_s=args.connector_timeout, ep_dispatch=args.ep_dispatch,
                     trace=args.trace, connector_delay_us=args.connector_delay_us)


def sampling_params(args):
    from afd_compile.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop, ignore_eos=args.ignore_eos)


def engine_config(args):
    from afd_compile.config import EngineConfig

    return EngineConfig(model=args.model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, dtype=args.dtype, device=args.device,
                        block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                        enable_prefix_caching=args.enable_prefix_caching)


def make_engine(args):
    from afd_compile.engine import LLMEngine

    return LLMEngine(engine_config(args))


def cluster_place(args) -> tuple[str, int] | None:
    """The (role, rank) torchrun or srun gave this process in args.afd_size; None when neither
    started it, or the command names its rank itself (--role/--rank)."""
    from afd_compile.roles.rank_spec import cluster_rank, trace_part

    if "placed" not in vars(args):  # once: the trace path below becomes this rank's part
        cluster, args.placed = cluster_rank(), None
        if cluster is not None and args.afd_size is not None and getattr(args, "rank", None) is None \
                and getattr(args, "role", None) is None:
            args.placed = cluster.role_rank(afd_config(args, "attention", 0).topology)
            if args.trace:  # every rank writes its own part, on its own host
                args.trace = trace_part(args.trace, *args.placed)
    return args.placed


def check_server_args(args) -> None:
    if not args.timeout_graceful_shutdown >= 0:
        raise AfdError(f"--timeout-graceful-shutdown must be 0 or more seconds, got {args.timeout_graceful_shutdown}")


def check_early(args) -> None:
    """What can be checked without the model, checked before anything loads or starts: the
    engine's options (--additional-config applied, `afd serve DIR` taken as --model), the model
    directory, the ports to serve on."""
    from afd_compile.config import DEFAULT_MODEL
    from afd_compile.model.loader import load_config

    if hasattr(args, "model") and hasattr(args, "dtype"):
        apply_additional_config(args)
        if getattr(args, "model_tag", None):
            args.model = args.model_tag
        if args.model is None:
            args.model = str(DEFAULT_MODEL)
        config = engine_config(args)
        args.device = config.device  # auto resolved once, for this process and its ranks
        hf = load_config(args.model)
        config.kv_cache_blocks(hf, config.resolve_max_model_len(hf))  # a KV pool too small for one sequence
    if args.command in ("serve", "launch", "console"):
        from afd_compile.serve.server import check_port_free

        placed = cluster_place(args) if args.command == "launch" else None
        if args.command == "console" or getattr(args, "afd_size", None) is None:
            attention_ranks = [0]
        elif placed is not None:  # one rank of a cluster launcher's deployment
            attention_ranks = [placed[1]] if placed[0] == "attention" else []
        else:
            topo = afd_config(args, "attention", 0).topology
            # a rank started alone (--rank i) serves port + i only
            attention_ranks = range(topo.num_attention) if getattr(args, "rank", None) is None else [args.rank]
        for i in attention_ranks:
            if args.port + i > 65535:
                raise AfdError(f"attention rank {i} would serve on port {args.port + i}: --port {args.port} "
                               f"leaves no room for {len(attention_ranks)} ranks (ports 1..65535)")
            check_port_free(args.host, args.port + i)
