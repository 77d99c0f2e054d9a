"""The API process's handle on the engine core process (engine_core.py): starts it, sends it
requests as typed messages over ZMQ, and turns the token ids it streams back into text deltas.

Detokenization and stop-string hold-back happen here, off the engine's interpreter (vLLM V1's
output processor). One reader thread receives everything the core sends and hands it to the
asyncio task waiting for it; the event loop alone sends. A core that dies fails every request
at once with a 503 error, and /health says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.engine.detokenizer import IncrementalDetokenizer, cut_at_stop, visible_text
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.errors import AfdError, NothingToRecord
from afd_compile.model.loader import chat_prompt_ids, load_tokenizer, prompt_ids
from afd_compile.serve import engine_core
from afd_compile.serve.async_engine import Delta as TokenDelta
from afd_compile.serve import messages as m

log = logging.getLogger("afd.serve")
# A prompt of more characters than this per token of the context cannot fit it: refused
# before tokenizing (tokenizing a 1 MB prompt takes ~0.5 s).
MAX_CHARS_PER_TOKEN = 64
POLL_MS = 200  # how often the reader looks at the core process while nothing arrives
METRICS_TIMEOUT_S = 5.0


@dataclass
class Delta(TokenDelta):
    """What a request gained since its last delta, its text included."""
    text: str = ""


class EngineClient:
    def __init__(self, engine_cfg: EngineConfig, afd: AFDConfig | None, warmup: bool, log_level: str = "WARNING"):
        """Starts the core and waits until it is Ready (built, compiled, warmed up). Raises
        AfdError with the core's own reason when it cannot start."""
        self.model = engine_cfg.model
        self._dir = Path(tempfile.mkdtemp(prefix="afd-engine-"))
        to_core, from_core = f"ipc://{self._dir}/to_core", f"ipc://{self._dir}/from_core"
        self._ctx = zmq.Context()
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.bind(to_core)
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.bind(from_core)
        self.process = multiprocessing.get_context("spawn").Process(
            target=engine_core.run, args=(engine_cfg, afd, warmup, to_core, from_core, log_level),
            name="afd-engine-core")
        self.process.start()
        self.healthy, self.reconnecting, self.error, self.stalled = False, False, None, None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._closed = False
        # Shutting down (the server stopped accepting): running requests go on; one that was still
        # being read or tokenized is refused with a 503.
        self.draining = False
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="afd-tokenize")
        try:
            self.tokenizer = load_tokenizer(engine_cfg.model)  # while the core loads
            ready = self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.max_model_len, self.backend = ready.max_model_len, ready.backend
        self.healthy = True
        self._reader = threading.Thread(target=self._read, name="afd-engine-client", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> m.Ready:
        while True:
            if self._inbox.poll(POLL_MS):
                message = m.decode(self._inbox.recv(), "api")
                if isinstance(message, m.Ready):
                    return message
                if isinstance(message, m.StartupFailed):
                    self.process.join(10)
                    raise AfdError(message.error if message.bad_input else f"the engine failed to start: {message.error}")
                raise m.ProtocolError(f"the engine core sent {type(message).__name__} before it was ready")
            if not self.process.is_alive():
                raise AfdError(f"the engine core process exited with code {self.process.exitcode} before it was "
                               "ready (its log is above)")

    async def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, tokenized off the event loop (a long prompt would stall every
        stream and /health while it tokenizes); one longer than the context could hold is
        refused before tokenizing, one with no token of its own (empty) after."""
        self._check_length(len(text))
        return await self._off_loop(lambda: prompt_ids(self.tokenizer, text))

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """/tokenize: the ids as they are, empty or not."""
        self._check_length(len(text))
        return await self._off_loop(lambda: self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        self._check_length(sum(len(str(msg.get("content") or "")) for msg in messages))
        return await self._off_loop(lambda: chat_prompt_ids(self.tokenizer, messages, self.model))

    def _check_length(self, chars: int) -> None:
        limit = MAX_CHARS_PER_TOKEN * self.max_model_len
        if chars > limit:
            raise AfdError(f"the prompt has {chars} characters; this model's context of {self.max_model_len} tokens "
                           f"holds no more than {limit} ({MAX_CHARS_PER_TOKEN} a token)")

    async def _off_loop(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn)

    # ---- requests
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        if not self.healthy or self.draining:
            yield Delta(error="the server is shutting down" if self.draining else self.error or "the engine is not running")
            return
        request_id, out = f"req-{uuid.uuid4().hex}", asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        detokenizer, token_ids, sent = IncrementalDetokenizer(self.tokenizer), [], 0
        finished = False
        if not self._send(m.AddRequest(request_id, prompt_token_ids, params)):
            self._streams.pop(request_id, None)
            yield Delta(error="the engine core is not taking requests")
            return
        try:
            while not finished:
                o = _merged(await out.get(), out)
                finished = o.finish_reason is not None or o.error is not None or o.bad_request is not None
                token_ids += o.token_ids
                detokenizer.update(token_ids)
                text = visible_text(cut_at_stop(detokenizer.text, params.stop)[0], params.stop,
                                    o.finish_reason is not None)
                delta, sent = text[sent:], max(sent, len(text))
                yield Delta(o.token_ids, o.logprobs, o.finish_reason, o.prompt_tokens, o.completion_tokens, o.error,
                            o.bad_request, text=delta)
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.healthy:  # the client went away: the core frees its slot
                self._send(m.AbortRequest(request_id))

    def abort_all(self) -> None:
        """Ends every running request now, each with finish_reason "abort" (a shutdown's deadline)."""
        for request_id in list(self._streams):
            self._send(m.AbortRequest(request_id))

    async def record_trace(self, steps: int, timeout_s: float) -> dict:
        if self.backend == "monolithic":
            raise AfdError("traces record the ranks of an AFD deployment; this server is monolithic")
        done: m.TraceDone = await self._ask(lambda i: m.StartTrace(i, steps, timeout_s), None)
        if done.error is not None:
            raise {400: AfdError, 409: NothingToRecord}.get(done.status, RuntimeError)(done.error)
        return done.trace

    async def metrics_text(self) -> bytes:
        """The core's Prometheus exposition (every metric is the engine's)."""
        if not self.healthy and not self.reconnecting:
            return b""
        return (await self._ask(m.GetMetrics, METRICS_TIMEOUT_S)).text

    async def _ask(self, make, timeout_s: float | None):
        i = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[i] = (asyncio.get_running_loop(), future)
        try:
            if not self._send(make(i)):
                raise RuntimeError("the engine core is not taking requests")
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(i, None)

    def _send(self, message) -> bool:
        """Queues a message for the core; False if it cannot take one (never blocks the loop)."""
        try:
            self._outbox.send(m.encode(message), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    # ---- the reader thread
    def _read(self) -> None:
        while not self._closed:
            try:
                if not self._inbox.poll(POLL_MS):
                    if not self.process.is_alive():
                        if not self._closed:  # else: the Shutdown close() sent
                            self._core_died()
                        return
                    continue
                message = m.decode(self._inbox.recv(), "api")
            except m.ProtocolError as e:
                log.error("%s", e)
                continue
            except zmq.ZMQError:  # closed under it
                return
            try:
                self._dispatch(message)
            except Exception:  # a bug here must not leave every later request without answers
                log.exception("dispatching %s failed", type(message).__name__)

    def _dispatch(self, message) -> None:
        if isinstance(message, m.Outputs):
            by_loop: dict = {}
            for o in message.outputs:
                stream = self._streams.get(o.request_id)
                if stream is not None:
                    by_loop.setdefault(stream[0], []).append((stream[1], o))
            for loop, items in by_loop.items():  # one wake-up of the event loop a step
                loop.call_soon_threadsafe(_put_all, items)
        elif isinstance(message, m.EngineState):
            self.healthy, self.reconnecting, self.error = message.healthy, message.reconnecting, message.error
            self.stalled = message.stalled
        elif isinstance(message, (m.TraceDone, m.Metrics)):
            pending = self._pending.get(message.ask_id)
            if pending is not None:
                pending[0].call_soon_threadsafe(_resolve, pending[1], message)
        else:
            log.error("the API process received %s from a running engine core", type(message).__name__)

    def _core_died(self) -> None:
        self.healthy, self.reconnecting = False, False
        self.error = f"the engine core process exited with code {self.process.exitcode}"
        log.error("%s", self.error)
        for request_id, (loop, out) in list(self._streams.items()):
            loop.call_soon_threadsafe(out.put_nowait, m.Output(request_id, [], [], None, 0, 0, error=self.error))
        for loop, future in list(self._pending.values()):
            loop.call_soon_threadsafe(_fail, future, RuntimeError(self.error))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the core (which says goodbye to its AFD peers) and waits for it."""
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            self._send(m.Shutdown())
            # Re-forming the AFD world, the core is blocked in the rendezvous: do not wait for it.
            self.process.join(1 if self.reconnecting else timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(2 * POLL_MS / 1000)
        self._outbox.close(linger=0)
        self._inbox.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def _merged(first: m.Output, queue: asyncio.Queue) -> m.Output:
    """first and every output already queued behind it, as one: a consumer (an SSE stream, its
    client) that fell behind the engine catches up in one chunk instead of one per token, as
    vLLM's output collector merges. Keeping up, it is one token a chunk."""
    if queue.empty():
        return first
    token_ids, logprobs, last = list(first.token_ids), list(first.logprobs), first
    while not queue.empty() and last.finish_reason is None and last.error is None and last.bad_request is None:
        last = queue.get_nowait()
        token_ids += last.token_ids
        logprobs += last.logprobs
    return m.Output(last.request_id, token_ids, logprobs, last.finish_reason, last.prompt_tokens,
                    last.completion_tokens, last.error, last.bad_request)


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
