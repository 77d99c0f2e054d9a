"""Joining the AFD world: torch.distributed over gloo, addressed by MASTER_ADDR / MASTER_PORT.

Global rank 0 (attention rank 0) hosts the TCP store; every other rank retries connecting
until `timeout_s`, so either role may start first. MASTER_IP (the seed's name) is accepted
for MASTER_ADDR; GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are read by gloo / NCCL themselves.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch.distributed as dist

from afd_compile.errors import AfdError
from afd_compile.topology import Topology

log = logging.getLogger("afd.rendezvous")


@dataclass
class World:
    topology: Topology
    role: str
    rank: int  # rank within the role
    global_rank: int
    ffn_group: dist.ProcessGroup | None  # expert-parallel group of the FFN ranks
    store: dist.Store  # the rendezvous key-value store, for connectors' own set-up
    run_id: str  # unique per deployment: names shared-memory segments
    nccl_group: dist.ProcessGroup | None = None  # all ranks, NCCL: the GPU connector's transfers


def master_address() -> tuple[str, int]:
    addr = os.environ.get("MASTER_ADDR") or os.environ.get("MASTER_IP") or "127.0.0.1"
    port = os.environ.get("MASTER_PORT", "29500")
    try:
        port_n = int(port)
    except ValueError:
        raise AfdError(f"MASTER_PORT={port!r} is not a port number") from None
    if not 0 < port_n < 65536:
        raise AfdError(f"MASTER_PORT={port_n} is out of range 1..65535")
    return addr, port_n


def local_launch_env() -> dict[str, str]:
    """Rendezvous address for ranks started by this process on one host: the user's
    MASTER_ADDR (or MASTER_IP) and MASTER_PORT when set, else loopback and a free port."""
    return {"MASTER_ADDR": os.environ.get("MASTER_ADDR") or os.environ.get("MASTER_IP") or "127.0.0.1",
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port())}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join(topology: Topology, role: str, rank: int, timeout_s: float, nccl: bool = False) -> World:
    addr, port = master_address()
    global_rank = topology.global_rank(role, rank)
    if global_rank == 0:
        log.info("attention rank 0 hosts the rendezvous on %s:%d and waits for %d more rank(s)", addr, port,
                 topology.world_size - 1)
    else:
        log.info("%s rank %d waits for the rendezvous at %s:%d (up to %.0f s)", role, rank, addr, port, timeout_s)
    try:
        store = dist.TCPStore(addr, port, topology.world_size, is_master=global_rank == 0,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=True)
        dist.init_process_group("gloo", store=store, rank=global_rank, world_size=topology.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # torch raises several types (DistNetworkError, RuntimeError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "address already in use" in str(e).lower() or "EADDRINUSE" in str(e):
            raise AfdError(f"port {port} on {addr} is already in use; set MASTER_PORT to a free port") from None
        raise AfdError(f"{role} rank {rank}: rendezvous at {addr}:{port} failed within {timeout_s:.0f} s "
                       f"(afd_size {topology}, are all {topology.world_size} ranks started with the same "
                       f"MASTER_ADDR/MASTER_PORT?): {first}") from None
    if global_rank == 0:
        store.set("afd/run_id", f"{os.getpid()}-{time.time_ns() % 10**9}")
    run_id = store.get("afd/run_id").decode()
    ffn_ranks = [topology.global_rank("ffn", j) for j in range(topology.num_ffn)]
    # new_group is collective over the whole world: every rank creates it, FFN ranks use it.
    ffn_group = dist.new_group(ffn_ranks, backend="gloo")
    # Every rank must create the same groups in the same order, so nccl is a deployment-wide setting.
    nccl_group = dist.new_group(list(range(topology.world_size)), backend="nccl") if nccl else None
    return World(topology, role, rank, global_rank, ffn_group if role == "ffn" else None, store, run_id, nccl_group)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
