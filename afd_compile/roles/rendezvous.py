"""Joining the AFD world: torch.distributed over gloo, addressed by MASTER_ADDR / MASTER_PORT.

Global rank 0 (attention rank 0) hosts the rendezvous store (store.py: bound to MASTER_ADDR's
interface, closed to ranks without the deployment's secret); every other rank retries
connecting until `timeout_s`, so either role may start first. MASTER_IP (the seed's name) is accepted
for MASTER_ADDR; GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are read by gloo / NCCL themselves.

The world forms in generations, as torchelastic's rendezvous rounds: when a rank dies, the
survivors leave the broken process group and join the next generation together with the
restarted rank. Attention rank 0 opens each generation under a fresh name (its store prefix
and shared-memory names), so nothing of a broken one is ever reused; the other ranks wait for
a generation newer than the one they left. If attention rank 0 itself died, its restart hosts
a new store on the same port, and everyone joins that.

Under a cluster launcher (torchrun, srun: rank_spec.cluster_rank) MASTER_ADDR:MASTER_PORT is
the launcher's own store (torchrun's agent's; under srun, launcher rank 0 hosts one), which
attention rank 0 need not share a host with: it binds this store on a free port of its own
host and publishes the address there, under the launcher's run and restart, for the others.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afd_compile.errors import AfdError
from afd_compile.roles.rank_spec import ClusterRank, cluster_rank
from afd_compile.roles.store import SECRET_ENV, SecretStore, StoreServer, dist_secret, new_secret
from afd_compile.topology import Topology

log = logging.getLogger("afd.rendezvous")

GENERATION_KEY = "afd/generation"  # the generation open for joining; deleted once every rank is in


@dataclass
class World:
    topology: Topology
    role: str
    rank: int  # rank within the role
    global_rank: int
    ffn_group: dist.ProcessGroup | None  # expert-parallel group of the FFN ranks
    store: dist.Store  # this generation's part of the rendezvous store, for connectors' own set-up
    generation: str  # unique per deployment and generation: names store keys and shared-memory segments
    nccl_group: dist.ProcessGroup | None = None  # all ranks, NCCL: the GPU connector's transfers
    store_client: SecretStore | None = None  # this rank's connection to the store, under `store`
    store_server: StoreServer | None = None  # global rank 0: the store itself, kept across generations
    address: tuple[str, int] | None = None  # the store's host and port, the same every generation
    hosts: list[str] = field(default_factory=list)  # each global rank's host name


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


_launcher_stores: list[dist.Store] = []  # kept open: the store srun's launcher rank 0 hosts serves until exit


def _cluster_address(cluster: ClusterRank, global_rank: int, timeout_s: float) -> tuple[str, int, StoreServer | None]:
    """The store's address under a cluster launcher; global rank 0 starts the store and publishes
    it (with a generated secret when the deployment has none) in the launcher's store."""
    master, master_port = master_address()
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        # torchrun's agent hosts the store its workers share (TORCHELASTIC_USE_AGENT_STORE); else, as
        # under srun, launcher rank 0 hosts it, as init_process_group("env://") would
        agent = cluster.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        launcher = dist.TCPStore(master, master_port, is_master=not agent and cluster.rank == 0,
                                 timeout=timeout, wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 (torch raises several types)
        raise AfdError(f"{cluster.launcher} rank {cluster.rank}: the launcher's store at {master}:{master_port} "
                       f"is unreachable ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                       f"{'torchrun sets MASTER_ADDR/MASTER_PORT' if cluster.launcher == 'torchrun' else 'under srun, set MASTER_ADDR to the host of task 0 and MASTER_PORT to a free port there'}") from None
    _launcher_stores.append(launcher)
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID", "")
    key = f"afd/rendezvous/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT') or os.environ.get('SLURM_STEP_ID', '0')}"
    if global_rank == 0:
        if not os.environ.get(SECRET_ENV):
            log.warning("no %s set: attention rank 0 made one and published it in %s's store, which anyone who "
                        "reaches %s:%d can read; set the same %s on every node to keep the rendezvous closed",
                        SECRET_ENV, cluster.launcher, master, master_port, SECRET_ENV)
            os.environ[SECRET_ENV] = new_secret()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the interface that reaches the launcher
            s.connect((socket.gethostbyname(master), master_port))
            host = s.getsockname()[0]
        server = StoreServer(host, 0, dist_secret())
        launcher.set(f"{key}/secret", os.environ[SECRET_ENV])
        launcher.set(key, f"{host}:{server.port}")
        return host, server.port, server
    try:
        launcher.wait([key], timeout)
    except Exception:  # noqa: BLE001
        raise AfdError(f"{cluster.launcher} rank {cluster.rank}: attention rank 0 published no rendezvous within "
                       f"{timeout_s:.0f} s (is it running?)") from None
    os.environ.setdefault(SECRET_ENV, launcher.get(f"{key}/secret").decode())
    host, _, port = launcher.get(key).decode().rpartition(":")
    return host, int(port), None


def local_launch_env() -> dict[str, str]:
    """Rendezvous for ranks started by this process on one host: the user's MASTER_ADDR (or
    MASTER_IP) and MASTER_PORT when set, else loopback and a free port; the user's secret
    (--dist-secret / AFD_DIST_SECRET), else a new one they share."""
    return {"MASTER_ADDR": os.environ.get("MASTER_ADDR") or os.environ.get("MASTER_IP") or "127.0.0.1",
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
            SECRET_ENV: os.environ.get(SECRET_ENV) or new_secret()}


def core_share(hosts: list[str], host: str, cores: int) -> int:
    """Threads for a rank on `host`: an equal share of its cores among the world's ranks there."""
    return max(1, cores // hosts.count(host))


def share_cores(world: World) -> None:
    """Gives this rank its share of its host's cores among the world's ranks there (unless
    OMP_NUM_THREADS is set): each rank's torch would otherwise use every core, and ranks whose
    OpenMP workers spin between parallel loops (libgomp's do, with no more OpenMP threads than
    cores in a process) take the cores from each other: a 1A1F server on 2 cores took 16 ms a
    token, 0.7 ms with one thread each. Each role calls it at start-up, after joining and before
    compiling anything (inductor bakes the thread count into its kernels)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        share = core_share(world.hosts, socket.gethostname(), len(os.sched_getaffinity(0)))
        torch.set_num_threads(min(torch.get_num_threads(), share))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join(topology: Topology, role: str, rank: int, timeout_s: float, nccl: bool = False,
         previous: World | None = None) -> World:
    """Joins the AFD world: its first generation, or, after `previous` broke, the next one."""
    if previous is not None:  # a group's sockets close only once nothing references it
        previous.ffn_group = previous.nccl_group = None
        if topology.global_rank(role, rank) != 0 and previous.store_client is not None:
            previous.store_client.close()  # the old store's host may be the rank that died
    leave()
    global_rank = topology.global_rank(role, rank)
    server, cluster = previous.store_server if previous else None, cluster_rank()
    if previous is not None:
        addr, port = previous.address
    elif cluster is not None:
        addr, port, server = _cluster_address(cluster, global_rank, timeout_s)
    else:
        addr, port = master_address()
    if global_rank == 0:
        log.info("attention rank 0 hosts the rendezvous on %s:%d and waits for %d more rank(s)", addr, port,
                 topology.world_size - 1)
    else:
        log.info("%s rank %d waits for the rendezvous at %s:%d (up to %.0f s)", role, rank, addr, port, timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    secret = dist_secret()
    try:
        if global_rank == 0:
            if previous is None:
                server = server or StoreServer(addr, port, secret)
                tcp = SecretStore(addr, port, secret, timeout_s)
            else:
                tcp = previous.store_client
            generation = f"{os.getpid()}-{time.time_ns() % 10**12}"
            tcp.set(GENERATION_KEY, generation)
        else:
            tcp = SecretStore(addr, port, secret, timeout_s)
            generation = _next_generation(tcp, previous.generation if previous else None, timeout_s)
        store = dist.PrefixStore(f"afd/{generation}/", tcp)
        dist.init_process_group("gloo", store=store, rank=global_rank, world_size=topology.world_size,
                                timeout=timeout)
    except AfdError:
        raise
    except Exception as e:  # torch raises several types (DistNetworkError, RuntimeError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "address already in use" in str(e).lower() or "EADDRINUSE" in str(e):
            raise AfdError(f"port {port} on {addr} is already in use; set MASTER_PORT to a free port") from None
        raise AfdError(f"{role} rank {rank}: rendezvous at {addr}:{port} failed within {timeout_s:.0f} s "
                       f"(afd_size {topology}, are all {topology.world_size} ranks started with the same "
                       f"MASTER_ADDR/MASTER_PORT?): {first}") from None
    if global_rank == 0:
        tcp.delete_key(GENERATION_KEY)  # every rank is in: a rank that starts now waits for the next one
    log.info("%s rank %d joined generation %s of the %s world", role, rank, generation, topology)
    hosts: list = [None] * topology.world_size  # for share_cores
    dist.all_gather_object(hosts, socket.gethostname())
    ffn_ranks = [topology.global_rank("ffn", j) for j in range(topology.num_ffn)]
    # new_group is collective over the whole world: every rank creates it, FFN ranks use it.
    ffn_group = dist.new_group(ffn_ranks, backend="gloo")
    # Every rank must create the same groups in the same order, so nccl is a deployment-wide setting.
    nccl_group = dist.new_group(list(range(topology.world_size)), backend="nccl") if nccl else None
    return World(topology, role, rank, global_rank, ffn_group if role == "ffn" else None, store, generation,
                 nccl_group, tcp, server, (addr, port), hosts)


def _next_generation(tcp: SecretStore, left: str | None, timeout_s: float) -> str:
    """Waits until attention rank 0 opens a generation other than the one this rank left."""
    deadline = time.monotonic() + timeout_s
    while True:
        if tcp.check([GENERATION_KEY]):
            generation = tcp.get(GENERATION_KEY).decode()
            if generation != left:
                return generation
        if time.monotonic() > deadline:
            raise AfdError(f"no new generation of the AFD world opened within {timeout_s:.0f} s "
                           "(is attention rank 0 running?)")
        time.sleep(0.05)


def leave() -> None:
    if dist.is_initialized():
        # Peers notice this rank left only when its gloo sockets close, and pending work objects
        # (a failed wait's traceback holds one) keep them open: collect them first.
        gc.collect()
        dist.destroy_process_group()
