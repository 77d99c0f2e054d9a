"""`afd serve`: starts the engine core process (monolithic, or an AFD attention rank; see
engine_core.py) and serves the API with uvicorn in this one."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.errors import AfdError
from afd_compile.serve.api_server import build_app
from afd_compile.serve.engine_client import EngineClient

log = logging.getLogger("afd.serve")
SHUTDOWN_GRACE_S = 30  # uvicorn's --timeout-graceful-shutdown, by default
# Streams still running this long before the grace period ends are ended with finish_reason
# "abort", so their clients get a last chunk and [DONE] instead of a cut connection.
ABORT_BEFORE_END_S = 3


HEADER_TIMEOUT_S = 20.0  # from a connection (or a kept-alive one's next bytes) to a request's complete headers
KEEP_ALIVE_TIMEOUT_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)


def h11_with_header_timeout(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    timeout_s after it opened (or after a kept-alive one began its next request): uvicorn has no
    header timeout, so a client sending headers a byte at a time (slowloris) would hold a
    connection for ever."""

    class Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            # The next request of a kept-alive connection (idle, the keep-alive timeout applies)
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete and self._header_timer is not None:
                self._header_timer.cancel()  # the headers are in: the body has its own timeout
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            self._header_timer = None
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    return Protocol


class _Server(uvicorn.Server):
    """uvicorn's graceful shutdown (stop accepting, let running requests finish), ending with
    finish_reason "abort" what would otherwise be cancelled mid-stream at its deadline."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient):
        super().__init__(config)
        self.engine = engine
        grace = config.timeout_graceful_shutdown
        self.abort_after_s = grace - min(ABORT_BEFORE_END_S, grace / 2)
        # Started by a supervisor (afd launch), which ignores Ctrl-C for its ranks and stops them in order.
        self.ignore_sigint = signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    def handle_exit(self, sig: int, frame) -> None:
        if not (sig == signal.SIGINT and self.ignore_sigint):
            super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self.engine.draining = True
        deadline = asyncio.get_running_loop().call_later(self.abort_after_s, self._abort_rest)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _abort_rest(self) -> None:
        log.warning("shutdown: ending the requests still running after %.0f s (finish_reason \"abort\")",
                    self.abort_after_s)
        self.engine.abort_all()


def serve(engine_cfg: EngineConfig, afd: AFDConfig | None, host: str, port: int, api_key: str | None,
          served_model_name: str | None, log_level: str, console: bool = False, warmup: bool = False,
          shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
    started = time.monotonic()
    if afd is not None and afd.rank:
        port += afd.rank  # attention rank i serves on port + i
    check_port_free(host, port)
    exposed = exposure_warning(host, console, api_key)
    if exposed:
        (log.error if console and api_key is None else log.warning)("%s", exposed)
    engine = EngineClient(engine_cfg, afd, warmup, log_level)
    name = served_model_name or str(engine_cfg.model)
    app = build_app(engine, name, api_key, engine.max_model_len, engine.backend)
    if console:  # opt-in: gradio is a heavy import every other server should not pay
        import gradio as gr

        from console.app import build_app as build_console

        app = gr.mount_gradio_app(app, build_console(), path="/console")
    log.info("start-up: ready in %.1f s, serving %s (%s) on http://%s:%d", time.monotonic() - started,
             Path(str(engine_cfg.model)).name, engine.backend, host, port)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler that was there
    # before: make that handler a normal exit so the engine (and the AFD links) close below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # uvicorn's own lines ("Application startup complete.") at INFO whatever --log-level says,
        # as the seed README checks for them; one line per request only with --log-level INFO/DEBUG.
        level = log_level.upper()
        # On SIGTERM uvicorn stops accepting and lets running requests finish, for at most
        # shutdown_grace_s (see _Server).
        config = uvicorn.Config(app, host=host, port=port, log_level="debug" if level == "DEBUG" else "info",
                                access_log=level in ("DEBUG", "INFO"), timeout_graceful_shutdown=shutdown_grace_s,
                                http=h11_with_header_timeout(HEADER_TIMEOUT_S), timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S)
        server = _Server(config, engine)
        try:
            server.run()
        except KeyboardInterrupt:  # a second Ctrl-C: uvicorn gave up waiting
            pass
        if not server.started:
            raise AfdError(f"could not serve on {host}:{port} (uvicorn's line above says why)")
    finally:
        engine.close()


def exposure_warning(host: str, console: bool, api_key: str | None) -> str | None:
    """What to tell the user about a bind address other machines can reach; None for loopback."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None  # unresolvable: binding says so
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return None
    if console and api_key is None:
        return (f"serving on {host}, reachable from other machines, with the console mounted and no --api-key: "
                "anyone who can reach this port can start processes on this machine")
    return f"serving on {host}, reachable from other machines" + ("" if api_key else " without an --api-key")


def check_port_free(host: str, port: int) -> None:
    """Before the engine loads: a port another process holds fails now, not after minutes of loading."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise AfdError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
