"""Connector microbenchmark: round-trip time per payload size for each backend, beside the
physical references measured in the same run (a raw TCP socket round trip on loopback and a
shared-memory copy). `afd bench --scenario connector`.

A round trip is what one layer costs an attention rank: send hidden states, get the same
number of bytes back. The echo side runs in a forked process, as an FFN rank would.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from afd_compile.connector.shm import ShmConnector
from afd_compile.roles.rendezvous import free_port
from benchmarks.report import format_table, machine_info, write_json

SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]


def _iters(nbytes: int) -> int:
    return max(20, min(500, (64 << 20) // nbytes))


def _recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        got += conn.recv_into(buf[got:])


def _tcp_echo(port: int, sizes: list[int]) -> None:
    with socket.create_server(("127.0.0.1", port)) as srv:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in sizes:
            buf = memoryview(bytearray(n))
            for _ in range(_iters(n) + 1):
                _recv_exact(conn, buf)
                conn.sendall(buf)


def tcp_rtt(sizes: list[int]) -> dict[int, float]:
    port = free_port()
    child = mp.get_context("fork").Process(target=_tcp_echo, args=(port, sizes))
    child.start()
    for _ in range(100):
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    for n in sizes:
        buf = memoryview(bytearray(n))
        times = []
        for i in range(_iters(n) + 1):
            start = time.perf_counter()
            conn.sendall(buf)
            _recv_exact(conn, buf)
            if i:  # the first round trip warms up
                times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    conn.close()
    child.join()
    return out


def shm_copy(sizes: list[int]) -> dict[int, float]:
    """Two memcpys of n bytes (there and back), the floor of any shared-memory transport."""
    out = {}
    for n in sizes:
        a, b = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        times = []
        for _ in range(_iters(n)):
            start = time.perf_counter()
            b.copy_(a)
            a.copy_(b)
            times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    return out


def _connector_echo(backend: str, port: int, sizes: list[int], name: str) -> None:
    torch.set_num_threads(1)
    conn = _make(backend, port, 1, name)
    for n in sizes:
        for _ in range(_iters(n) + 1):
            x = conn.recv_attn_output(0, n // 4, 0)
            conn.send_ffn_output(0, x, 0)
            conn.flush()
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def _make(backend: str, port: int, rank: int, name: str):
    """rank 0 plays the attention side, rank 1 the FFN side; hidden size 1, fp32."""
    if backend == "shm":
        return ShmConnector({0: (name, rank == 0)}, 1, torch.float32, 60, is_attention=rank == 0,
                            max_message_tokens=max(SIZES) // 4)
    from afd_compile.connector.gloo import GlooConnector

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    return GlooConnector({0: 1 - rank}, 1, torch.float32, 60)


def connector_rtt(backend: str, sizes: list[int]) -> dict[int, float]:
    port, name = free_port(), f"afd-bench-{os.getpid()}"
    conn = _make(backend, port, 0, name) if backend == "shm" else None  # shm: creator first
    child = mp.get_context("fork").Process(target=_connector_echo, args=(backend, port, sizes, name))
    child.start()
    conn = conn or _make(backend, port, 0, name)
    out = {}
    for n in sizes:
        x = torch.zeros(n // 4)
        times = []
        for i in range(_iters(n) + 1):
            start = time.perf_counter()
            conn.send_attn_output(x.unsqueeze(1), 0)
            conn.recv_ffn_output(0)
            if i:
                times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    child.join()
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def run(args) -> dict:
    torch.set_num_threads(1)
    sizes = SIZES
    results = {"tcp (raw socket)": tcp_rtt(sizes), "shm copy (memcpy x2)": shm_copy(sizes)}
    for backend in ("gloo", "shm"):
        results[f"connector {backend}"] = connector_rtt(backend, sizes)
    headers = ["payload", *results]
    rows = [[_human(n), *(results[k][n] * 1e6 for k in results)] for n in sizes]
    print("round trip, microseconds (median)\n" + format_table(headers, rows))
    at_4k = {k: v[4 << 10] for k, v in results.items()}
    fastest = min(("connector gloo", "connector shm"), key=at_4k.get)
    ratio = at_4k[fastest] / at_4k["tcp (raw socket)"]
    print(f"\nfastest same-host backend at 4 KB: {fastest}, {ratio:.2f}x raw TCP")
    result = {"scenario": "connector", "machine": machine_info(), "unit": "seconds (median round trip)",
              "results": {k: {str(n): t for n, t in v.items()} for k, v in results.items()},
              "fastest_at_4KB": fastest, "fastest_vs_tcp_at_4KB": ratio}
    print(f"wrote {write_json(result, 'connector', getattr(args, 'out', None))}")
    return result


def _human(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"
