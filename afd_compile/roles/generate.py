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
from afd_compile.roles.rank_spec import deployment, trace_parts
from afd_compile.roles.rendezvous import local_launch_env


def attention_rank_generate(engine_cfg: EngineConfig, afd: AFDConfig, prompts: list, params: SamplingParams,
                            chat: bool) -> None:
    from afd_compile.roles.worker import attention_engine

    engine, rank = attention_engine(engine_cfg, afd)
    mine = list(range(afd.rank, len(prompts), afd.topology.num_attention))
    try:
        encoded = [engine.encode_chat([{"role": "user", "content": prompts[i]}]) if chat else prompts[i] for i in mine]
        completions = engine.generate(encoded, params) if encoded else []
        for i, c in zip(mine, completions):
            print(json.dumps({"index": i, "text": c.text, "token_ids": c.token_ids}), flush=True)
    finally:
        rank.close()


def launch_generate(afd_size: str, options: list[str], attention_extra: list[str], num_prompts: int,
                    trace: str | None = None, relay_logs: bool = True) -> list[str]:
    """Starts all ranks of afd_size locally, each attention rank with attention_extra (sampling
    flags, then "--" and the prompts); returns the completions in prompt order."""
    ranks = deployment(afd_size, options, attention="generate", attention_extra=attention_extra, trace=trace)
    sup = Supervisor(local_launch_env(), relay_logs=relay_logs,
                     capture_stdout=tuple(r.name for r in ranks if r.role == "attention"))
    try:
        for rank in ranks:
            sup.start(rank.name, rank.argv())
        sup.wait()
    except KeyboardInterrupt:
        sup.stop()
        raise
    results = {}
    for child in sup.children:
        for line in child.stdout_lines:
            row = json.loads(line)
            results[row["index"]] = row["text"]
    if trace:
        from afd_compile.trace import merge

        merge(trace_parts(afd_size, trace), trace)
    missing = [i for i in range(num_prompts) if i not in results]
    if missing:
        raise AfdError(f"the attention ranks returned no completion for prompts {missing}")
    return [results[i] for i in range(num_prompts)]
