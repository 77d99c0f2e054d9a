"""What a rank is and how it starts: a RankSpec (role, rank, afd_size, options) gives the `afd`
arguments that start it, for every launcher (`afd launch`, `afd serve`/`afd ffn` without
--rank, `afd generate --afd-size`, the console's Launch tab, the command lines it shows to copy).

Cluster launchers number a deployment's processes 0..N-1 themselves: torchrun (RANK,
WORLD_SIZE, LOCAL_RANK) and Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Launcher
rank r is FFN rank r for r < F, else attention rank r - F: FFN ranks first, the order
`deployment` lists them in, so `torchrun --nnodes 2 --nproc-per-node 2 -m afd_compile launch
--afd-size 2A2F` puts the FFN ranks on the first node.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from afd_compile.errors import AfdError
from afd_compile.topology import Topology

LAUNCHER_ORDER = ("ffn", "attention")


def afd_argv(args: Sequence[str]) -> list[str]:
    """The process that runs `afd ARGS` with this interpreter (where the entry point is not installed)."""
    return [sys.executable, "-m", "afd_compile.cli", *args]


def trace_part(trace: str, role: str, rank: int) -> str:
    """The file one rank writes its part of the deployment's trace to (merged into `trace`)."""
    return f"{trace}.{role}{rank}.json"


@dataclass(frozen=True)
class RankSpec:
    """One rank of a deployment: `afd COMMAND --afd-size X OPTIONS --rank R [--trace PART] EXTRA`.

    command: ffn, serve (an attention rank with the API server, or a monolithic server when
    afd_size is None) or generate (an attention rank of a batch generate); options: the
    deployment's flags, the same on every rank; extra: the role's own (server flags, prompts)."""

    role: str  # "ffn", "attention", or "server" (monolithic)
    rank: int
    command: str
    afd_size: str | None = None
    options: tuple[str, ...] = ()
    trace: str | None = None
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "server" if self.afd_size is None else f"{self.role} {self.rank}"

    def args(self) -> list[str]:
        out = [self.command] + (["--role", "attention"] if self.command == "generate" else [])
        if self.afd_size is not None:
            out += ["--afd-size", self.afd_size, *self.options, "--rank", str(self.rank)]
        else:
            out += self.options
        if self.trace:
            out += ["--trace", trace_part(self.trace, self.role, self.rank)]
        return out + list(self.extra)

    def argv(self) -> list[str]:
        return afd_argv(self.args())


def deployment(afd_size: str | None, options: Sequence[str], *, attention: str = "serve",
               attention_extra: Sequence[str] = (), trace: str | None = None,
               roles: Sequence[str] = LAUNCHER_ORDER) -> list[RankSpec]:
    """Every rank of afd_size of the given roles, FFN ranks first (either side may start first);
    afd_size None: the one monolithic server."""
    if afd_size is None:
        return [RankSpec("server", 0, "serve", None, tuple(options), extra=tuple(attention_extra))]
    topology = Topology.parse(afd_size)
    return [RankSpec(role, rank, "ffn" if role == "ffn" else attention, str(topology), tuple(options), trace,
                     () if role == "ffn" else tuple(attention_extra))
            for role in LAUNCHER_ORDER if role in roles for rank in range(topology.num_ranks(role))]


def trace_parts(afd_size: str, trace: str, roles: Sequence[str] = LAUNCHER_ORDER) -> list[str]:
    return [trace_part(trace, s.role, s.rank) for s in deployment(afd_size, (), roles=roles)]


@dataclass(frozen=True)
class ClusterRank:
    """The place a cluster launcher gave this process: launcher rank, world size, rank on its node."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    world_size: int
    local_rank: int

    def role_rank(self, topology: Topology) -> tuple[str, int]:
        if self.world_size != topology.world_size:
            raise AfdError(f"{self.launcher} started {self.world_size} processes, but afd_size {topology} has "
                           f"{topology.world_size} ranks ({topology.num_ffn} FFN, then {topology.num_attention} "
                           "attention): start one process per rank")
        if self.rank < topology.num_ffn:
            return "ffn", self.rank
        return "attention", self.rank - topology.num_ffn


def cluster_rank(env: Mapping[str, str] = os.environ) -> ClusterRank | None:
    """The rank torchrun or srun gave this process; None when neither started it."""
    if "TORCHELASTIC_RUN_ID" in env:  # torchrun's agent sets it, with RANK, WORLD_SIZE, LOCAL_RANK
        keys, launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # a task of srun's job step, not the batch script
        keys, launcher = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "slurm"
    else:
        return None
    try:
        rank, world_size, local_rank = (int(env[k]) for k in keys)
    except (KeyError, ValueError):
        raise AfdError(f"{launcher} started this process, but {', '.join(keys)} are not all set to "
                       f"numbers: {', '.join(f'{k}={env.get(k)!r}' for k in keys)}") from None
    return ClusterRank(launcher, rank, world_size, local_rank)
