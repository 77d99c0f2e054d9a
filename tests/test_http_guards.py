"""The HTTP layer's guards, in process (no engine): timeouts for headers, bodies and idle
keep-alive, the API key's scheme, and the warning for a bind address other machines reach
(issue 21, item 6)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from afd_compile.roles.rendezvous import free_port
from afd_compile.serve.api_server import build_app
from afd_compile.serve.server import exposure_warning, h11_with_header_timeout


class _NoEngine:
    """What build_app reads of an EngineClient, for endpoints that never reach the engine."""
    tokenizer, healthy, reconnecting, error, stalled, draining, max_model_len, backend = (
        None, True, False, None, None, False, 64, "x")

    async def metrics_text(self) -> bytes:
        return b"afd:up 1\n"


def _app(**kw):
    return build_app(_NoEngine(), "m", **kw)


@pytest.fixture
def server():
    """A real uvicorn (h11 with a 0.5 s header timeout, 1 s keep-alive) on loopback, in a thread."""
    port = free_port()
    config = uvicorn.Config(_app(body_timeout_s=0.5), host="127.0.0.1", port=port, log_level="error",
                            http=h11_with_header_timeout(0.5), timeout_keep_alive=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(10)


def _closed_within(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took."""
    sock.settimeout(limit_s)
    t0, got = time.monotonic(), b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return got, time.monotonic() - t0
        got += chunk


def test_headers_sent_a_byte_at_a_time_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the headers
        got, took = _closed_within(s, 5)
    assert got.startswith(b"HTTP/1.1 408") and took < 3


def test_a_connection_that_sends_nothing_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        got, took = _closed_within(s, 5)
    assert took < 3


def test_a_body_shorter_than_declared_is_a_408(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        got, took = _closed_within(s, 5)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"did not arrive within" in got and took < 3


def test_an_idle_keep_alive_connection_is_closed_and_a_complete_request_is_served(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got, took = _closed_within(s, 5)  # answered, kept alive, then closed when idle past 1 s
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.1") == 1 and b'"ok"' in got
    assert 0.8 < took < 3


@pytest.mark.parametrize("header, status", [("Bearer k3y", 200), ("bearer k3y", 200), ("BEARER  k3y", 200),
                                            ("Bearer wrong", 401), ("Basic k3y", 401), ("k3y", 401), ("", 401)])
def test_api_key_scheme_is_case_insensitive(header, status):
    async def go():
        transport = httpx.ASGITransport(app=_app(api_key="k3y"))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/metrics", headers={"Authorization": header} if header else {})).status_code

    assert asyncio.run(go()) == status


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", True, None) is None
    assert exposure_warning("localhost", True, None) is None
    assert exposure_warning("::1", False, None) is None
    assert "without an --api-key" in exposure_warning("0.0.0.0", False, None)
    assert "without" not in exposure_warning("0.0.0.0", False, "k")
    assert "can start processes" in exposure_warning("0.0.0.0", True, None)
    assert "can start processes" not in exposure_warning("0.0.0.0", True, "k")


def test_serve_warns_of_a_non_loopback_host_before_loading(caplog, monkeypatch):
    """The warning comes before the engine loads (here the engine is never built)."""
    from afd_compile.serve import server as srv

    class Stop(Exception):
        pass

    def no_engine(*a, **k):
        raise Stop

    monkeypatch.setattr(srv, "EngineClient", no_engine)
    with caplog.at_level(logging.WARNING, logger="afd.serve"), pytest.raises(Stop):
        srv.serve(None, None, "0.0.0.0", free_port(), None, None, "WARNING", console=True)
    assert any(r.levelno == logging.ERROR and "can start processes" in r.getMessage() for r in caplog.records)


def test_serve_refuses_a_port_in_use_before_loading():
    from afd_compile.errors import AfdError
    from afd_compile.serve.server import check_port_free

    with socket.create_server(("127.0.0.1", 0)) as s:
        with pytest.raises(AfdError, match="cannot serve on 127.0.0.1"):
            check_port_free("127.0.0.1", s.getsockname()[1])
