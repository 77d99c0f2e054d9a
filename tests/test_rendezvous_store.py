"""The rendezvous store is closed: it listens on MASTER_ADDR's interface only, and a client
without the deployment's secret can neither read nor write it nor join the world (issue 21,
item 5)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from afd_compile.errors import AfdError
from afd_compile.roles.rendezvous import free_port
from afd_compile.roles.store import SecretStore, StoreServer
from tests.test_afd_errors import afd_cli, assert_clean_error


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on port."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.rsplit(":", 1)
                if int(p, 16) == port and state == "0A":  # LISTEN
                    found.append(addr)
    return found


def test_store_listens_on_loopback_only_when_master_addr_is_loopback():
    server = StoreServer("127.0.0.1", 0, b"s")
    try:
        assert _listening(server.port) == ["0100007F"]  # 127.0.0.1, no wildcard
    finally:
        server.close()


def test_a_stranger_can_neither_read_nor_write_the_store():
    server = StoreServer("127.0.0.1", 0, b"the secret")
    try:
        rank = SecretStore("127.0.0.1", server.port, b"the secret", 5)
        rank.set("afd/generation", b"g1")
        with pytest.raises(AfdError, match="refused this rank"):
            SecretStore("127.0.0.1", server.port, b"a guess", 5)
        with pytest.raises(AfdError, match="refused this rank"):
            SecretStore("127.0.0.1", server.port, b"", 5)
        # A raw client that skips the handshake: a request in the store's framing gets nothing back.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.recv(32)  # the challenge
            raw.sendall(b"\x00" * 64 + b"\x00\x00\x00\x05\x93\xa3set\xa1k\xa1v")
            try:
                answer = raw.recv(100)
            except ConnectionResetError:  # closed with the request unread
                answer = b""
            assert answer == b""  # closed unanswered
        assert rank.check(["afd/generation"]) and not rank.check(["k"])
        assert rank.get("afd/generation") == b"g1"
        rank.close()
    finally:
        server.close()


def test_a_rank_without_the_secret_cannot_join_the_world(tiny_greedy_checkpoint):
    """Attention rank 0 hosts the store with one secret; an FFN rank started with another is
    refused with one clear line instead of joining."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "AFD_DIST_SECRET": "right"}
    host = subprocess.Popen([sys.executable, "-m", "afd_compile.cli", "generate", "--model", str(tiny_greedy_checkpoint),
                             "--enforce-eager", "--afd-size", "1A1F", "--role", "attention", "--rank", "0",
                             "--connector-timeout", "30", "1 2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        stranger = afd_cli("ffn", "--model", str(tiny_greedy_checkpoint), "--afd-size", "1A1F", "--rank", "0",
                           "--connector-timeout", "20", "--dist-secret", "wrong",
                           env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        assert_clean_error(stranger, "refused this rank", "--dist-secret")
        assert host.poll() is None  # the deployment waits on for its real FFN rank
    finally:
        host.kill()
        host.wait(10)
