"""`afd generate --afd-size xAyF`: the foundation's generate, run through AFD roles.

Without --role, this process launches every rank locally (F FFN ranks, A attention ranks)
and prints the completions in prompt order. With --role attention --rank i, it is attention
rank i: it generates prompts[i::A] and writes one JSON line per completion for the launcher.
"""

from __future__ import annotations

import json

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.errors import AfdError
from afd_compile.roles.launcher import Supervisor
from afd_compile.roles.rendezvous import local_launch_env


def attention_rank_generate(engine_cfg: EngineConfig, afd: AFDConfig, prompts: list, params: SamplingParams,
                            chat: bool) -> None:
    from afd_compile.roles.worker import attention_engine, leave_attention

    engine, tracer = attention_engine(engine_cfg, afd)
    mine = list(range(afd.rank, len(prompts), afd.topology.num_attention))
    try:
        encoded = [engine.encode_chat([{"role": "user", "content": prompts[i]}]) if chat else prompts[i] for i in mine]
        completions = engine.generate(encoded, params) if encoded else []
        for i, c in zip(mine, completions):
            print(json.dumps({"index": i, "text": c.text, "token_ids": c.token_ids}), flush=True)
    finally:
        leave_attention(engine, tracer, afd)


def rank_args(args, role: str, rank: int) -> list[str]:
    """The command line that starts one rank with this invocation's settings."""
    out = ["--model", str(args.model), "--afd-size", args.afd_size, "--rank", str(rank),
           "--micro-batches", str(args.micro_batches), "--connector", args.connector,
           "--connector-timeout", str(args.connector_timeout), "--ep-dispatch", args.ep_dispatch,
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--log-level", args.log_level]
    if args.max_model_len is not None:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager:
        out.append("--enforce-eager")
    if getattr(args, "connector_delay_us", 0):
        out += ["--connector-delay-us", str(args.connector_delay_us)]
    if getattr(args, "trace", None):
        out += ["--trace", f"{args.trace}.{role}{rank}.json"]
    return ["ffn", *out] if role == "ffn" else ["generate", "--role", "attention", *out]


def launch_generate(args, sampling_argv: list[str]) -> list[str]:
    """Starts all ranks of args.afd_size locally; returns the completions in prompt order."""
    from afd_compile.config import AFDConfig

    topo = AFDConfig(afd_size=args.afd_size).topology
    env = local_launch_env()
    attention_names = [f"attention {i}" for i in range(topo.num_attention)]
    sup = Supervisor(env, relay_logs=args.log_level.upper() in ("DEBUG", "INFO"), capture_stdout=tuple(attention_names))
    try:
        for j in range(topo.num_ffn):
            sup.start(f"ffn {j}", rank_args(args, "ffn", j))
        for i, name in enumerate(attention_names):
            extra = ["--chat"] if args.chat else []
            sup.start(name, [*rank_args(args, "attention", i), *sampling_argv, *extra, "--", *args.prompt])
        sup.wait()
    except KeyboardInterrupt:
        sup.stop()
        raise
    results = {}
    for child in sup.children:
        for line in child.stdout_lines:
            row = json.loads(line)
            results[row["index"]] = row["text"]
    if getattr(args, "trace", None):
        from afd_compile.trace import merge

        merge([f"{args.trace}.{n.replace(' ', '')}.json" for n in
               [*[f"ffn{j}" for j in range(topo.num_ffn)], *[f"attention{i}" for i in range(topo.num_attention)]]],
              args.trace)
    missing = [i for i in range(len(args.prompt)) if i not in results]
    if missing:
        raise AfdError(f"the attention ranks returned no completion for prompts {missing}")
    return [results[i] for i in range(len(args.prompt))]
