"""The OpenAI-compatible REST API's app: the guards in front of every request (API key, body size
and time) and the error handlers that answer in OpenAI's error schema. The endpoints are in routes.py."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from afd_compile.serve.engine_client import EngineClient
from afd_compile.serve.routes import APIError, Serving, error_response, router

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # to receive a request's whole body (nginx's client_body_timeout is 60 s between reads)


def _union_tag(part) -> bool:
    """pydantic puts the branch of a union into an error's location (`stop.str`,
    `prompt.list[int].0`): not part of the field's path."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or any(c in part for c in "[]()-"))


class BodyLimit:
    """ASGI middleware: 413 for a body streamed (chunked, no Content-Length) past the limit (the
    guard middleware refuses a declared Content-Length over it before anything is read), and 408
    for a body not received within timeout_s: a client that declares more than it sends would
    hold its request open for ever (uvicorn has no body timeout)."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited():
            nonlocal seen, complete
            if complete:  # the body is in: what comes next is the disconnect, whenever it comes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:  # raised inside FastAPI's body read, which passes HTTPException on
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:.0f} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class Guard(BaseHTTPMiddleware):
    """The API key (every path but /health), and 413 for a declared Content-Length over the limit."""

    def __init__(self, app, api_key: str | None):
        super().__init__(app)
        self.api_key = api_key

    async def dispatch(self, request: Request, call_next):
        if request.url.path != "/health" and self.api_key is not None:
            # The scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time.
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                return error_response(401, "invalid or missing API key", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)


async def on_validation(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p))
    message = first.get("msg", "invalid request")
    if any(_union_tag(p) for p in first.get("loc", ())):  # this was the first branch of a union to fail
        message += " (nor does it match the field's other accepted types)"
    return error_response(400, f"{where}: {message}" if where else f"request body: {message}", param=where or None)


async def on_http_error(_, exc: StarletteHTTPException):  # unknown path, wrong method, 413, ...
    kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))


async def on_bug(_, exc: Exception):  # still the error schema; the traceback goes to the log only
    return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                          "internal_error")


async def on_api_error(_, exc: APIError):
    return error_response(exc.status, exc.message, exc.kind, exc.param)


def build_app(engine: EngineClient, served_model_name: str, api_key: str | None = None, max_model_len: int = 0,
              backend: str = "monolithic", body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    app = FastAPI(title="afd-compile", description="OpenAI-compatible API over Attention-FFN disaggregated MoE")
    app.state.serving = Serving(engine, served_model_name, max_model_len, backend)
    # Added first, so it sits inside the guard: its 413 is raised straight into FastAPI's body read
    # (through the guard's receive, a task group would wrap it into an ExceptionGroup, a 400).
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, timeout_s=body_timeout_s)
    app.add_middleware(Guard, api_key=api_key)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)
    app.add_exception_handler(APIError, on_api_error)
    app.include_router(router)
    return app
