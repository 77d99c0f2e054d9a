"""The OpenAI-compatible REST API: /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics, and vLLM's /version, /tokenize, /detokenize. Errors use OpenAI's error schema."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from afd_compile import __version__
from afd_compile.errors import AfdError, NothingToRecord
from afd_compile.serve.engine_client import Delta, EngineClient
from afd_compile.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorBody,
                                        ErrorResponse, SamplingRequest, TokenizeChatRequest,
                                        TokenizeCompletionRequest, TraceRequest, Usage, new_id, now)

log = logging.getLogger("afd.serve")
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # to receive a request's whole body (nginx's client_body_timeout is 60 s between reads)
# prompts x n of one request: 3000 one-token prompts with n=16 (15 KB) queued 48,000 sequences
# ahead of every other client's request.
MAX_CHOICES = 256
# What /openapi.json promises for the generating endpoints: JSON, or SSE with "stream": true.
GENERATE_RESPONSES = {200: {"content": {"text/event-stream": {}}}, 400: {"model": ErrorResponse},
                      404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def _union_tag(part) -> bool:
    """pydantic puts the branch of a union into an error's location (`stop.str`,
    `prompt.list[int].0`): not part of the field's path."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or any(c in part for c in "[]()-"))


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None):
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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


def build_app(engine: EngineClient, served_model_name: str, api_key: str | None = None, max_model_len: int = 0,
              backend: str = "monolithic", body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    app = FastAPI(title="afd-compile", description="OpenAI-compatible API over Attention-FFN disaggregated MoE")
    tokenizer = engine.tokenizer

    # Added first, so it sits inside the guard: its 413 is raised straight into FastAPI's body read
    # (through the guard's receive, a task group would wrap it into an ExceptionGroup, a 400).
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, timeout_s=body_timeout_s)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health" and api_key is not None:
            # The scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time.
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return error_response(401, "invalid or missing API key", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p))
        message = first.get("msg", "invalid request")
        if any(_union_tag(p) for p in first.get("loc", ())):  # this was the first branch of a union to fail
            message += " (nor does it match the field's other accepted types)"
        return error_response(400, f"{where}: {message}" if where else f"request body: {message}",
                              param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_, exc: StarletteHTTPException):  # unknown path, wrong method, 413, ...
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(_, exc: Exception):  # still the error schema; the traceback goes to the log only
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              "internal_error")

    @app.exception_handler(APIError)
    async def on_api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    def check_model(req, need_engine: bool = True) -> None:
        if need_engine and not engine.healthy:  # known down: say so now, not after a 200 has started a stream
            raise APIError(503, f"the backend is unavailable: {engine.error}", "service_unavailable")
        if req.model is not None and req.model != served_model_name:
            raise APIError(404, f"the model `{req.model}` does not exist; this server serves `{served_model_name}`",
                           "NotFoundError", "model")

    def max_tokens(req: SamplingRequest, prompt_len: int, requested: int | None, param: str = "max_tokens") -> int:
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                                f"has {prompt_len} tokens",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        if requested is None:
            return room
        if requested > room:
            raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                                "completion)", param=param)
        return requested

    def params(req: SamplingRequest, n_max: int, logprobs: int | None, index: int):
        try:
            return req.sampling_params(n_max, logprobs, index)
        except AfdError as e:
            raise APIError(400, str(e)) from None

    async def collect_all(streams: list[AsyncIterator[Delta]]) -> list[Delta]:
        """Runs the n choices (and prompts) of a request side by side, so they share the batch; if
        one fails, the others are cancelled, which aborts them in the engine."""
        tasks = [asyncio.ensure_future(collect(s)) for s in streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def unless_client_gone(request: Request, work: Awaitable[list[Delta]]) -> list[Delta]:
        """Awaits a non-streaming request's work, or cancels it once the client has closed the
        connection: cancelled, its sequences are aborted in the engine, freeing their KV slots."""
        task, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                raise APIError(499, "the client closed the connection before the completion finished")
            return task.result()
        finally:
            task.cancel()
            gone.cancel()

    async def client_gone(request: Request) -> None:
        # The body is read, so the next ASGI message is the disconnect. request.is_disconnected()
        # only peeks, and behind the guard middleware (a BaseHTTPMiddleware) it never saw one.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(stream: AsyncIterator[Delta]) -> Delta:
        total = Delta()
        async for d in stream:
            if d.error:
                raise APIError(503, f"the backend is unavailable: {d.error}", "service_unavailable")
            if d.bad_request:
                raise APIError(400, d.bad_request)
            total.text += d.text
            total.token_ids += d.token_ids
            total.logprobs += d.logprobs
            total.finish_reason, total.prompt_tokens, total.completion_tokens = (
                d.finish_reason, d.prompt_tokens, d.completion_tokens)
        return total

    def chat_logprobs(items: list[dict]) -> dict:
        def entry(tid, lp):
            tok = tokenizer.convert_ids_to_tokens(tid)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

        return {"content": [{**entry(i["token_id"], i["logprob"]), "top_logprobs": [entry(t, v) for t, v in i["top"]]}
                            for i in items]}

    def with_ids(delta: Delta) -> list[dict]:
        return [{**lp, "token_id": tid} for lp, tid in zip(delta.logprobs, delta.token_ids)]

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_chunks(streams, make_chunk, usage_chunk, prompt_tokens: int) -> AsyncIterator[str]:
        """Interleaves the n choices' deltas into OpenAI chunks; ends with [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, stream):
            async for d in stream:
                await queue.put((index, d))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        done, completion_tokens = 0, 0
        try:
            while done < len(tasks):
                index, d = await queue.get()
                if d is None:
                    done += 1
                    continue
                if d.error or d.bad_request:
                    status = 503 if d.error else 400
                    yield sse(ErrorResponse(error=ErrorBody(message=d.error or d.bad_request, code=status,
                                                            type="service_unavailable" if d.error else
                                                            "invalid_request_error")).model_dump())
                    break
                if d.finish_reason is not None:
                    completion_tokens += d.completion_tokens
                yield sse(make_chunk(index, d))
            if usage_chunk is not None:
                yield sse(usage_chunk(Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                            total_tokens=prompt_tokens + completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    @app.get("/health")
    async def health():
        if engine.reconnecting:  # an AFD peer died: requests get 503 until the world re-forms
            return JSONResponse({"status": "degraded", "backend": backend, "message": f"the AFD world is re-forming "
                                 f"after {engine.error}; queued requests wait for it"}, status_code=503)
        if not engine.healthy:
            return error_response(503, f"the backend is down: {engine.error}", "service_unavailable")
        if engine.stalled:  # requests still wait for it: degraded, not down
            return JSONResponse({"status": "degraded", "backend": backend, "message": engine.stalled}, status_code=503)
        return {"status": "ok", "backend": backend}

    @app.post("/debug/trace", responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def trace(req: TraceRequest):
        """Records the next `steps` steps of every rank of this AFD deployment (while requests
        run; at most `timeout` s) and returns them merged, as Chrome trace JSON (open in
        Perfetto). 409 when no request runs, or none ran within the timeout."""
        try:
            return await engine.record_trace(req.steps, req.timeout)
        except NothingToRecord as e:
            raise APIError(409, str(e), "conflict") from None
        except AfdError as e:
            raise APIError(400, str(e)) from None

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        try:
            text = await engine.metrics_text()
        except (asyncio.TimeoutError, RuntimeError) as e:
            return error_response(503, f"the engine's metrics are unavailable: {e or 'no answer'}",
                                  "service_unavailable")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize", responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest):
        """vLLM's /tokenize: the ids a prompt (or the chat prompt of messages) becomes."""
        check_model(req, need_engine=False)
        try:
            if isinstance(req, TokenizeChatRequest):
                ids = await engine.encode_chat([m.model_dump() for m in req.messages])
            else:
                ids = await engine.tokenize(req.prompt, req.add_special_tokens)
        except AfdError as e:
            raise APIError(400, str(e), param="messages" if isinstance(req, TokenizeChatRequest) else "prompt") from None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/detokenize", responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def detokenize(req: DetokenizeRequest):
        check_model(req, need_engine=False)
        bad = [t for t in req.tokens if not 0 <= t < len(tokenizer)]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary (0..{len(tokenizer) - 1})",
                           param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": now(),
                                            "owned_by": "afd-compile", "max_model_len": max_model_len}]}

    @app.post("/v1/chat/completions", responses=GENERATE_RESPONSES)
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req)
        try:
            prompt = await engine.encode_chat([m.model_dump() for m in req.messages])
        except AfdError as e:
            raise APIError(400, str(e), param="messages") from None
        n_max = (max_tokens(req, len(prompt), req.max_completion_tokens, "max_completion_tokens")
                 if req.max_completion_tokens else max_tokens(req, len(prompt), req.max_tokens))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        streams = [engine.generate(prompt, params(req, n_max, logprobs, i)) for i in range(req.n)]
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            opened: set[int] = set()

            def chunk(i, d):  # as OpenAI: the role in each choice's first delta only
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                if i not in opened:
                    opened.add(i)
                    delta = {"role": "assistant", "content": d.text}
                choice = {"index": i, "delta": delta, "finish_reason": d.finish_reason}
                if logprobs is not None:
                    choice["logprobs"] = chat_logprobs(with_ids(d))
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_model_name,
                        "choices": [choice]}

            usage = None
            if req.stream_options and req.stream_options.include_usage:
                def usage(u):
                    return {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": served_model_name, "choices": [], "usage": u.model_dump()}
            return StreamingResponse(stream_chunks(streams, chunk, usage, len(prompt)), media_type="text/event-stream")
        results = await unless_client_gone(request, collect_all(streams))
        choices = []
        for i, r in enumerate(results):
            choice = {"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
            if logprobs is not None:
                choice["logprobs"] = chat_logprobs(with_ids(r))
            choices.append(choice)
        completion = sum(r.completion_tokens for r in results)
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": Usage(prompt_tokens=len(prompt), completion_tokens=completion,
                                                   total_tokens=len(prompt) + completion).model_dump()}

    @app.post("/v1/completions", responses=GENERATE_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} asks for {len(prompts) * req.n} completions; at "
                                f"most {MAX_CHOICES} per request", param="prompt")
        try:
            encoded = [await engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        except AfdError as e:
            raise APIError(400, str(e), param="prompt") from None
        if any(not e for e in encoded):
            raise APIError(400, "the prompt is empty", param="prompt")
        jobs = []  # (prompt index, prompt ids, stream)
        for pi, ids in enumerate(encoded):
            n_max = max_tokens(req, len(ids), req.max_tokens)
            jobs += [(pi, ids, engine.generate(ids, params(req, n_max, req.logprobs, i))) for i in range(req.n)]
        rid, created = new_id("cmpl"), now()

        def text_logprobs(d: Delta) -> dict:
            toks = [tokenizer.convert_ids_to_tokens(t) for t in d.token_ids]
            return {"tokens": toks, "token_logprobs": [lp["logprob"] for lp in d.logprobs],
                    "top_logprobs": [{tokenizer.convert_ids_to_tokens(t): v for t, v in lp["top"]}
                                     for lp in d.logprobs], "text_offset": []}

        def echo(pi):
            return prompts[pi] if isinstance(prompts[pi], str) else tokenizer.decode(encoded[pi])

        if req.stream:
            echoed: set[int] = set()

            def chunk(i, d):
                text = (echo(jobs[i][0]) if req.echo and i not in echoed else "") + d.text
                echoed.add(i)
                choice = {"index": i, "text": text, "finish_reason": d.finish_reason,
                          "logprobs": text_logprobs(d) if req.logprobs is not None else None}
                return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                        "choices": [choice]}

            usage = None
            if req.stream_options and req.stream_options.include_usage:
                def usage(u):
                    return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                            "choices": [], "usage": u.model_dump()}
            return StreamingResponse(stream_chunks([j[2] for j in jobs], chunk, usage, sum(len(e) for e in encoded)),
                                     media_type="text/event-stream")
        results = await unless_client_gone(request, collect_all([j[2] for j in jobs]))
        choices = [{"index": i, "text": (echo(jobs[i][0]) if req.echo else "") + r.text,
                    "finish_reason": r.finish_reason,
                    "logprobs": text_logprobs(r) if req.logprobs is not None else None} for i, r in enumerate(results)]
        prompt_tokens = sum(len(e) for e in encoded)  # as OpenAI: each prompt once, whatever n
        completion = sum(r.completion_tokens for r in results)
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                                   total_tokens=prompt_tokens + completion).model_dump()}

    return app
