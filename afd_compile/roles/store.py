"""The rendezvous store: a key-value store on attention rank 0 that only ranks holding the
deployment's shared secret can use.

torch's TCPStore listens on every interface and serves anyone who connects: any process that
reaches MASTER_PORT could read the world's keys, write them, or join the world. This store binds
the interface of MASTER_ADDR (loopback when that is loopback) and starts every connection with a
mutual HMAC-SHA256 challenge over the secret (`--dist-secret` / AFD_DIST_SECRET; `afd launch`
makes one for its ranks), so a stranger learns nothing and can change nothing. It is a
torch.distributed Store (a Python subclass, as c10d allows), so gloo's own rendezvous runs over it.

Frames are a 4-byte length and a msgpack array: [op, *args] -> [ok, value].
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from datetime import timedelta

import msgspec
import torch.distributed as dist

from afd_compile.errors import AfdError

log = logging.getLogger("afd.rendezvous")
SECRET_ENV = "AFD_DIST_SECRET"
HANDSHAKE_TIMEOUT_S = 5.0
MAX_FRAME = 256 << 20  # a merged trace travels through the store
_NONCE = 32


def dist_secret(given: str | None = None) -> bytes:
    """The deployment's secret: --dist-secret, else AFD_DIST_SECRET, else none (an empty key)."""
    return (given if given is not None else os.environ.get(SECRET_ENV, "")).encode()


def new_secret() -> str:
    return secrets.token_hex(32)


def _proof(secret: bytes, side: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, side + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the connection closed")
        buf += chunk
    return bytes(buf)


def _send_frame(sock: socket.socket, obj) -> None:
    data = msgspec.msgpack.encode(obj)
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_frame(sock: socket.socket):
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError(f"a frame of {n} bytes")
    return msgspec.msgpack.decode(_recv_exact(sock, n))


class StoreServer:
    """The store itself, on attention rank 0: one thread per authenticated connection."""

    def __init__(self, host: str, port: int, secret: bytes):
        self.secret = secret
        self.data: dict[str, bytes] = {}
        self.changed = threading.Condition()
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise AfdError(f"port {port} on {host} is already in use; set MASTER_PORT to a free port") from None
            raise AfdError(f"the rendezvous store cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="afd-store", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn, peer), name="afd-store-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                nonce = secrets.token_bytes(_NONCE)
                conn.sendall(nonce)
                answer = _recv_exact(conn, 32 + _NONCE)
                if not hmac.compare_digest(answer[:32], _proof(self.secret, b"rank", nonce)):
                    log.warning("the rendezvous store refused a connection from %s: it does not hold the "
                                "deployment's secret", peer[0])
                    return
                conn.sendall(_proof(self.secret, b"store", answer[32:]))
                conn.settimeout(None)
                while True:
                    _send_frame(conn, self._handle(_recv_frame(conn)))
            except (ConnectionError, OSError, msgspec.DecodeError, ValueError, TypeError):
                return  # the rank went away (or spoke nonsense): its thread ends

    def _handle(self, request: list):
        op, args = request[0], request[1:]
        with self.changed:
            if op == "set":
                self.data[args[0]] = bytes(args[1])
                self.changed.notify_all()
                return [True, None]
            if op == "add":
                value = int(self.data.get(args[0], b"0")) + int(args[1])
                self.data[args[0]] = str(value).encode()
                self.changed.notify_all()
                return [True, value]
            if op == "compare_set":
                key, expected, desired = args[0], bytes(args[1]), bytes(args[2])
                current = self.data.get(key)
                if (current is None and not expected) or current == expected:
                    self.data[key] = current = desired
                    self.changed.notify_all()
                return [True, current if current is not None else expected]
            if op in ("get", "wait"):
                keys = [args[0]] if op == "get" else list(args[0])
                if not self.changed.wait_for(lambda: all(k in self.data for k in keys), timeout=float(args[1])):
                    return [False, f"timed out after {float(args[1]):.0f} s waiting for {keys}"]
                return [True, self.data[keys[0]] if op == "get" else None]
            if op == "check":
                return [True, all(k in self.data for k in args[0])]
            if op == "delete":
                return [True, self.data.pop(args[0], None) is not None]
            if op == "num_keys":
                return [True, len(self.data)]
        return [False, f"unknown operation {op!r}"]

    def close(self) -> None:
        self.sock.close()


class SecretStore(dist.Store):
    """A rank's connection to the StoreServer, as a torch.distributed Store."""

    def __init__(self, host: str, port: int, secret: bytes, timeout_s: float):
        super().__init__()
        self.address, self.timeout_s = (host, port), timeout_s
        self.lock = threading.Lock()
        self.sock = self._connect(secret, time.monotonic() + timeout_s)

    def _connect(self, secret: bytes, deadline: float) -> socket.socket:
        """Connects (the store may not be up yet: retries until the deadline) and proves the secret."""
        host, port = self.address
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=HANDSHAKE_TIMEOUT_S)
                break
            except OSError as e:
                if time.monotonic() > deadline:  # the caller says which world it was waiting for
                    raise TimeoutError(f"no rendezvous store answered at {host}:{port}: {e.strerror or e}") from None
                time.sleep(0.1)
        try:
            server_nonce = _recv_exact(sock, _NONCE)
            nonce = secrets.token_bytes(_NONCE)
            sock.sendall(_proof(secret, b"rank", server_nonce) + nonce)
            if not hmac.compare_digest(_recv_exact(sock, 32), _proof(secret, b"store", nonce)):
                raise ConnectionError("it answered with a wrong proof")
        except (ConnectionError, OSError) as e:
            sock.close()
            raise AfdError(f"the rendezvous store at {host}:{port} refused this rank ({e}): are all ranks started "
                           f"with the same --dist-secret / {SECRET_ENV}?") from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _call(self, *request):
        with self.lock:
            try:
                _send_frame(self.sock, list(request))
                ok, value = _recv_frame(self.sock)
            except (ConnectionError, OSError) as e:
                raise RuntimeError(f"the rendezvous store at {self.address[0]}:{self.address[1]} is gone: {e}") from None
        if not ok:
            raise RuntimeError(f"rendezvous store: {value}")
        return value

    @staticmethod
    def _bytes(value) -> bytes:
        return value.encode() if isinstance(value, str) else bytes(value)

    def _timeout(self, timeout: timedelta | None) -> float:
        return self.timeout_s if timeout is None else timeout.total_seconds()

    # the dist.Store interface
    def set(self, key: str, value) -> None:
        self._call("set", key, self._bytes(value))

    def get(self, key: str) -> bytes:
        return bytes(self._call("get", key, self.timeout_s))

    def add(self, key: str, value: int) -> int:
        return int(self._call("add", key, int(value)))

    def compare_set(self, key: str, expected, desired) -> bytes:
        return bytes(self._call("compare_set", key, self._bytes(expected), self._bytes(desired)))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._call("wait", list(keys), self._timeout(timeout))

    def check(self, keys: list[str]) -> bool:
        return bool(self._call("check", list(keys)))

    def delete_key(self, key: str) -> bool:
        return bool(self._call("delete", key))

    def num_keys(self) -> int:
        return int(self._call("num_keys"))

    def close(self) -> None:
        self.sock.close()
