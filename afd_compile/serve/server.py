"""`afd serve`: starts the engine core process (monolithic, or an AFD attention rank; see
engine_core.py) and serves the API with uvicorn in this one."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import uvicorn

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.serve.api_server import build_app
from afd_compile.serve.engine_client import EngineClient

log = logging.getLogger("afd.serve")
SHUTDOWN_GRACE_S = 30


def serve(engine_cfg: EngineConfig, afd: AFDConfig | None, host: str, port: int, api_key: str | None,
          served_model_name: str | None, log_level: str, console: bool = False, warmup: bool = False) -> None:
    engine = EngineClient(engine_cfg, afd, warmup, log_level)
    name = served_model_name or str(engine_cfg.model)
    app = build_app(engine, name, api_key, engine.max_model_len, engine.backend)
    if console:  # opt-in: gradio is a heavy import every other server should not pay
        import gradio as gr

        from console.app import build_app as build_console

        app = gr.mount_gradio_app(app, build_console(), path="/console")
    if afd is not None and afd.rank:
        port += afd.rank  # attention rank i serves on port + i
    log.info("serving %s (%s) on http://%s:%d", Path(str(engine_cfg.model)).name, engine.backend, host, port)
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
        engine.close()
