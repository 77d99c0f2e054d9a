"""`afd serve`: builds the engine (monolithic, or an AFD attention rank), runs it on the
engine thread, and serves the API with uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import uvicorn

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.serve.api_server import build_app
from afd_compile.serve.async_engine import AsyncEngine
from afd_compile.serve.metrics import Metrics

log = logging.getLogger("afd.serve")
SHUTDOWN_GRACE_S = 30


def make_async_engine(engine_cfg: EngineConfig, afd: AFDConfig | None, warmup: bool = False
                      ) -> tuple[AsyncEngine, str]:
    """The engine is built on its own thread (AsyncEngine.build). warmup: compiles every decode
    shape before the engine serves (see LLMEngine.warm_up)."""
    metrics = Metrics()

    def parts() -> dict:  # AsyncEngine's arguments, made on its engine thread
        if afd is None:
            from afd_compile.engine.llm_engine import LLMEngine

            engine, rank = LLMEngine(engine_cfg), {}
        else:
            from afd_compile.roles.worker import attention_engine, leave_attention, rejoin_attention

            engine, tracer = attention_engine(engine_cfg, afd)
            rank = dict(idle=engine.runner.idle, on_exit=lambda: leave_attention(engine, tracer, afd),
                        reconnect=lambda: rejoin_attention(engine, afd))
        if warmup:
            engine.warm_up()
        if afd is not None:  # after the warm-up: its waits are not the deployment's latency
            engine.runner.wait_observer = lambda layer, s: metrics.connector_latency.labels(str(layer)).observe(s)
        return dict(engine=engine, metrics=metrics, **rank)

    return AsyncEngine.build(parts), "monolithic" if afd is None else f"AFD {afd.topology}"


def serve(engine_cfg: EngineConfig, afd: AFDConfig | None, host: str, port: int, api_key: str | None,
          served_model_name: str | None, log_level: str, console: bool = False, warmup: bool = False) -> None:
    async_engine, backend = make_async_engine(engine_cfg, afd, warmup)
    name = served_model_name or str(engine_cfg.model)
    app = build_app(async_engine, name, api_key, async_engine.engine.max_model_len, backend)
    if console:  # opt-in: gradio is a heavy import every other server should not pay
        import gradio as gr

        from console.app import build_app as build_console

        app = gr.mount_gradio_app(app, build_console(), path="/console")
    if afd is not None and afd.rank:
        port += afd.rank  # attention rank i serves on port + i
    log.info("serving %s (%s) on http://%s:%d", Path(str(engine_cfg.model)).name, backend, host, port)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler that was there
    # before: make that handler a normal exit so the engine (and the AFD links) close below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # uvicorn's own lines ("Application startup complete.") at INFO whatever --log-level says,
        # as the seed README checks for them; one line per request only with --log-level INFO/DEBUG.
        level = log_level.upper()
        # On SIGTERM uvicorn stops accepting and lets running requests finish, for at most
        # SHUTDOWN_GRACE_S; what is still running then is cancelled (its KV slot freed).
        uvicorn.run(app, host=host, port=port, log_level="debug" if level == "DEBUG" else "info",
                    access_log=level in ("DEBUG", "INFO"), timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        async_engine.close()
