"""The endpoints: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, vLLM's /version,
/tokenize and /detokenize, and /health, /metrics and /debug/trace. They read what they serve from
app.state.serving (build_app sets it), as vLLM's routes read its engine client."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from afd_compile import __version__
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.errors import AfdError, NothingToRecord
from afd_compile.serve.engine_client import Delta, EngineClient
from afd_compile.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                        ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, ChatLogprob,
                                        ChatLogprobs, ChatLogprobToken, ChatMessage, CompletionLogprobs,
                                        CompletionRequest, CompletionResponse, CompletionResponseChoice,
                                        CompletionStreamResponse, DeltaMessage, DetokenizeRequest, DetokenizeResponse,
                                        Envelope, ErrorResponse, HealthResponse, ModelCard, ModelList, SamplingRequest,
                                        TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse, TraceRequest,
                                        Usage, VersionResponse, new_id, now)

# prompts x n of one request: 3000 one-token prompts with n=16 (15 KB) queued 48,000 sequences
# ahead of every other client's request.
MAX_CHOICES = 256
# What /openapi.json promises for the generating endpoints: JSON, or SSE with "stream": true.
GENERATE_RESPONSES = {200: {"content": {"text/event-stream": {}}}, 400: {"model": ErrorResponse},
                      404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
ERROR_RESPONSES = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}

router = APIRouter()


class APIError(Exception):
    """Refuses a request: answered in OpenAI's error schema with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None):
    return JSONResponse(ErrorResponse.of(status, message, kind, param).model_dump(), status_code=status,
                        headers=headers)


@dataclass
class Serving:
    """The engine and the model the routes serve, with the checks and shaping that need them."""

    engine: EngineClient
    model: str
    max_model_len: int
    backend: str

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, req, need_engine: bool = True) -> None:
        if need_engine and not self.engine.healthy:  # known down: say so now, not after a 200 has started a stream
            raise APIError(503, f"the backend is unavailable: {self.engine.error}", "service_unavailable")
        if req.model is not None and req.model != self.model:
            raise APIError(404, f"the model `{req.model}` does not exist; this server serves `{self.model}`",
                           "NotFoundError", "model")

    def max_tokens(self, req: SamplingRequest, prompt_len: int, requested: int | None,
                   param: str = "max_tokens") -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the "
                                f"prompt has {prompt_len} tokens",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        if requested is None:
            return room
        if requested > room:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                                "completion)", param=param)
        return requested

    def chat_logprobs(self, d: Delta) -> ChatLogprobs:
        def entry(tid, lp):
            tok = self.tokenizer.convert_ids_to_tokens(tid)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

        return ChatLogprobs(content=[ChatLogprobToken(**entry(tid, lp["logprob"]), top_logprobs=[
            ChatLogprob(**entry(t, v)) for t, v in lp["top"]]) for lp, tid in zip(d.logprobs, d.token_ids)])

    def text_logprobs(self, d: Delta) -> CompletionLogprobs:
        token = self.tokenizer.convert_ids_to_tokens
        return CompletionLogprobs(tokens=[token(t) for t in d.token_ids],
                                  token_logprobs=[lp["logprob"] for lp in d.logprobs],
                                  top_logprobs=[{token(t): v for t, v in lp["top"]} for lp in d.logprobs])


def serving(request: Request) -> Serving:
    return request.app.state.serving


def sampling(req: SamplingRequest, n_max: int, logprobs: int | None, index: int) -> SamplingParams:
    try:
        return req.sampling_params(n_max, logprobs, index)
    except AfdError as e:
        raise APIError(400, str(e)) from None


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


async def collect_all(streams: list[AsyncIterator[Delta]]) -> list[Delta]:
    """Runs the n choices (and prompts) of a request side by side, so they share the batch; if
    one fails, the others are cancelled, which aborts them in the engine."""
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def client_gone(request: Request) -> None:
    # The body is read, so the next ASGI message is the disconnect. request.is_disconnected()
    # only peeks, and behind the guard middleware (a BaseHTTPMiddleware) it never saw one.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, work: Awaitable[list[Delta]]) -> list[Delta]:
    """Awaits a non-streaming request's work, or cancels it once the client has closed the
    connection: cancelled, its sequences are aborted in the engine, freeing their KV blocks."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise APIError(499, "the client closed the connection before the completion finished")
        return task.result()
    finally:
        task.cancel()
        gone.cancel()


def sse(body: BaseModel) -> str:
    return f"data: {json.dumps(body.model_dump())}\n\n"


async def stream_chunks(streams: list[AsyncIterator[Delta]], choice: Callable[[int, Delta], BaseModel],
                        chunk: Callable[..., Envelope], prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Interleaves the n choices' deltas into OpenAI chunks, chunk(choices=[choice(i, delta)]);
    then, if asked for, chunk(choices=[], usage=...); ends with [DONE]."""
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
                yield sse(ErrorResponse.of(503, d.error, "service_unavailable") if d.error else
                          ErrorResponse.of(400, d.bad_request))
                break
            if d.finish_reason is not None:
                completion_tokens += d.completion_tokens
            yield sse(chunk(choices=[choice(index, d)]))
        if include_usage:
            yield sse(chunk(choices=[], usage=Usage.of(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream")


@router.get("/health")
async def health(request: Request):
    s = serving(request)
    if s.engine.reconnecting:  # an AFD peer died: requests get 503 until the world re-forms
        why = f"the AFD world is re-forming after {s.engine.error}; queued requests wait for it"
    elif not s.engine.healthy:
        return error_response(503, f"the backend is down: {s.engine.error}", "service_unavailable")
    elif s.engine.stalled:  # requests still wait for it: degraded, not down
        why = s.engine.stalled
    else:
        return HealthResponse(status="ok", backend=s.backend).model_dump()
    return JSONResponse(HealthResponse(status="degraded", backend=s.backend, message=why).model_dump(), status_code=503)


@router.post("/debug/trace", responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
async def trace(req: TraceRequest, request: Request):
    """Records the next `steps` steps of every rank of this AFD deployment (while requests
    run; at most `timeout` s) and returns them merged, as Chrome trace JSON (open in
    Perfetto). 409 when no request runs, or none ran within the timeout."""
    try:
        return await serving(request).engine.record_trace(req.steps, req.timeout)
    except NothingToRecord as e:
        raise APIError(409, str(e), "conflict") from None
    except AfdError as e:
        raise APIError(400, str(e)) from None


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    try:
        text = await serving(request).engine.metrics_text()
    except (asyncio.TimeoutError, RuntimeError) as e:
        return error_response(503, f"the engine's metrics are unavailable: {e or 'no answer'}", "service_unavailable")
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.get("/version")
async def version():
    return VersionResponse(version=__version__).model_dump()


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest, request: Request):
    """vLLM's /tokenize: the ids a prompt (or the chat prompt of messages) becomes."""
    s = serving(request)
    s.check_model(req, need_engine=False)
    try:
        if isinstance(req, TokenizeChatRequest):
            ids = await s.engine.encode_chat([m.model_dump() for m in req.messages])
        else:
            ids = await s.engine.tokenize(req.prompt, req.add_special_tokens)
    except AfdError as e:
        raise APIError(400, str(e), param="messages" if isinstance(req, TokenizeChatRequest) else "prompt") from None
    return TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids).model_dump()


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(req: DetokenizeRequest, request: Request):
    s = serving(request)
    s.check_model(req, need_engine=False)
    vocab = len(s.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})", param="tokens")
    return DetokenizeResponse(prompt=s.tokenizer.decode(req.tokens)).model_dump()


@router.get("/v1/models")
async def models(request: Request):
    s = serving(request)
    return ModelList(data=[ModelCard(id=s.model, created=now(), max_model_len=s.max_model_len)]).model_dump()


@router.post("/v1/chat/completions", responses=GENERATE_RESPONSES)
async def chat(req: ChatCompletionRequest, request: Request):
    s = serving(request)
    s.check_model(req)
    try:
        prompt = await s.engine.encode_chat([m.model_dump() for m in req.messages])
    except AfdError as e:
        raise APIError(400, str(e), param="messages") from None
    n_max = (s.max_tokens(req, len(prompt), req.max_completion_tokens, "max_completion_tokens")
             if req.max_completion_tokens else s.max_tokens(req, len(prompt), req.max_tokens))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    streams = [s.engine.generate(prompt, sampling(req, n_max, logprobs, i)) for i in range(req.n)]
    head = {"id": new_id("chatcmpl"), "created": now(), "model": s.model}
    if req.stream:
        opened: set[int] = set()

        def choice(i: int, d: Delta) -> ChatCompletionResponseStreamChoice:  # as OpenAI: the role in the first only
            if i in opened:
                delta = DeltaMessage(content=d.text if d.text or d.finish_reason is None else None)
            else:
                opened.add(i)
                delta = DeltaMessage(role="assistant", content=d.text)
            return ChatCompletionResponseStreamChoice(index=i, delta=delta, finish_reason=d.finish_reason,
                                                      logprobs=s.chat_logprobs(d) if logprobs is not None else None)

        return event_stream(stream_chunks(streams, choice, functools.partial(ChatCompletionStreamResponse, **head),
                                          len(prompt), req.include_usage))
    results = await unless_client_gone(request, collect_all(streams))
    return ChatCompletionResponse(**head, choices=[ChatCompletionResponseChoice(
        index=i, message=ChatMessage(role="assistant", content=r.text), finish_reason=r.finish_reason,
        logprobs=s.chat_logprobs(r) if logprobs is not None else None) for i, r in enumerate(results)],
        usage=Usage.of(len(prompt), sum(r.completion_tokens for r in results))).model_dump()


async def encode_prompts(s: Serving, req: CompletionRequest) -> tuple[list, list[list[int]]]:
    """The request's prompts (one, or a batch of texts or of token lists) and their ids."""
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} asks for {len(prompts) * req.n} completions; at "
                            f"most {MAX_CHOICES} per request", param="prompt")
    try:
        encoded = [await s.engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    except AfdError as e:
        raise APIError(400, str(e), param="prompt") from None
    if any(not e for e in encoded):
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompts, encoded


@router.post("/v1/completions", responses=GENERATE_RESPONSES)
async def completions(req: CompletionRequest, request: Request):
    s = serving(request)
    s.check_model(req)
    prompts, encoded = await encode_prompts(s, req)
    owner, streams = [], []  # per choice: the index of its prompt, its stream
    for pi, ids in enumerate(encoded):
        n_max = s.max_tokens(req, len(ids), req.max_tokens)
        for i in range(req.n):
            owner.append(pi)
            streams.append(s.engine.generate(ids, sampling(req, n_max, req.logprobs, i)))
    head = {"id": new_id("cmpl"), "created": now(), "model": s.model}
    prompt_tokens = sum(len(e) for e in encoded)  # as OpenAI: each prompt once, whatever n
    echoed: set[int] = set()  # with echo: the choices whose prompt is sent (once, first)

    def choice(i: int, d: Delta) -> CompletionResponseChoice:
        text = d.text
        if req.echo and i not in echoed:
            pi = owner[i]
            text = (prompts[pi] if isinstance(prompts[pi], str) else s.tokenizer.decode(encoded[pi])) + text
        echoed.add(i)
        return CompletionResponseChoice(index=i, text=text, finish_reason=d.finish_reason,
                                        logprobs=s.text_logprobs(d) if req.logprobs is not None else None)

    if req.stream:
        return event_stream(stream_chunks(streams, choice, functools.partial(CompletionStreamResponse, **head),
                                          prompt_tokens, req.include_usage))
    results = await unless_client_gone(request, collect_all(streams))
    return CompletionResponse(**head, choices=[choice(i, r) for i, r in enumerate(results)],
                              usage=Usage.of(prompt_tokens, sum(r.completion_tokens for r in results))).model_dump()
