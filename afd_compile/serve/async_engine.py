"""Runs the engine on its own thread and streams each request's new tokens to asyncio tasks: in
`afd serve`, those of the engine core process (engine_core.py), which relay them to the API.

The engine is single-threaded by design: only the loop thread touches it. Callers queue typed
commands (the engine core's own messages: AddRequest, AbortRequest, Shutdown; and Listen,
RecordTrace in-process) and read deltas from a per-request asyncio.Queue or the sink.
Between steps the loop admits new requests, so they join the running batch (continuous
batching). The engine's rank (engine.rank.Rank) is all the loop knows of a deployment: an AFD
attention rank with nothing to do keeps its FFN ranks in step with `idle()` rounds; while no
rank has work it waits for a request between them, up to IDLE_WAIT_S.

When an AFD step fails (a peer died), the requests that were running fail at once; the loop
then re-forms the AFD world with the rank's `reconnect()` while queued requests wait for it,
and the server reports itself degraded until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from afd_compile.engine.llm_engine import LLMEngine
from afd_compile.engine.rank import Rank
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.sequence import Sequence
from afd_compile.errors import AfdError, NothingToRecord
from afd_compile.serve import messages as m
from afd_compile.serve.metrics import Metrics, StatLogger

log = logging.getLogger("afd.serve")

# An idle AFD attention rank waits this long for a request before its next idle round, doubling
# while every rank stays idle: a request arriving meanwhile starts at once, and an idle
# deployment exchanges a round per 20 ms, not a busy loop.
IDLE_WAIT_S = (0.0005, 0.02)
# A step (or an AFD idle round) running longer than this is reported: /health turns "degraded"
# while an FFN rank is stopped or silent, long before the connector timeout fails the step.
STALL_LIMIT_S = 5.0


@dataclass
class Delta:
    """A request's new tokens since the last delta (their text is the API process's to decode)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the engine failed; the handler answers 503
    bad_request: str | None = None  # add_request refused the request; 400


@dataclass
class _Stream:
    target: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None  # generate()'s queue; None: the sink's
    seq: Sequence
    arrival: float
    sent_tokens: int = 0
    first_token_at: float | None = None


@dataclass
class Listen:
    """A request whose deltas go to an asyncio queue of this process (generate()), not to the sink."""
    request: m.AddRequest
    target: tuple[asyncio.AbstractEventLoop, asyncio.Queue]


@dataclass
class RecordTrace:
    steps: int
    timeout_s: float
    future: asyncio.Future


# The loop's commands: the engine core's messages themselves, and this process's own two.
Command = m.AddRequest | m.AbortRequest | m.Shutdown | Listen | RecordTrace


class AsyncEngine:
    def __init__(self, build: Callable[[], tuple[LLMEngine, Rank]], metrics: Metrics | None = None):
        """build() makes the engine and its rank (engine.rank.Rank if monolithic) on the engine
        thread, which then serves; its exception is raised here. So that thread alone runs torch:
        with a second thread's OpenMP pool alive there are more OpenMP threads than cores, and
        libgomp puts them to sleep between a step's parallel loops, a futex wake-up per loop (a
        batch-1 step: 2.7 ms on the engine thread against 0.21 ms on the thread that built it)."""
        # Set by the engine core before its first submit(): called on the engine thread with each
        # step's [(request_id, Delta)], one call a step instead of a wake-up per request.
        self.sink: Callable[[list[tuple[str, Delta]]], None] | None = None
        self.metrics = metrics or Metrics()
        self.stat_logger = StatLogger()
        self.commands: queue.Queue[Command] = queue.Queue()
        self.streams: dict[str, _Stream] = {}
        self.error: str | None = None
        self.reconnecting = False  # degraded: the links are being re-formed, queued requests wait
        self._stopped = threading.Event()
        self._step_started: float | None = None  # while the loop is inside a step or an idle round
        # The pending recording of record_trace: (steps, timeout_s, deadline, the futures of every
        # caller sharing it).
        self._trace: tuple[int, float, float, list[asyncio.Future]] | None = None
        built, failure = threading.Event(), []

        def run() -> None:
            try:
                self.engine, self.rank = build()
                self.metrics.watch_kv_cache(self.engine.scheduler.block_manager.usage)
            except BaseException as e:  # handed to the caller, which raises it
                failure.append(e)
                return
            finally:
                built.set()
            self._loop()

        self.thread = threading.Thread(target=run, name="afd-engine", daemon=True)
        self.thread.start()
        built.wait()
        if failure:
            raise failure[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        return self.error is None and self.thread.is_alive()

    @property
    def serving(self) -> bool:
        """Requests already queued will still be answered: healthy, or re-forming the AFD world."""
        return self.thread.is_alive() and (self.error is None or self.reconnecting)

    # ---- handler side
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        if not self.healthy:
            yield Delta(error=self.error or "the engine is not running")
            return
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        self.commands.put(Listen(m.AddRequest(request_id, prompt_token_ids, params), (loop, out)))
        finished, get = False, None
        try:
            while True:
                # Wait in slices, re-checking the loop: an "add" still queued when it died is never
                # answered, and this request must then fail, not hang (and hang shutdown).
                get = get or asyncio.ensure_future(out.get())
                done, _ = await asyncio.wait({get}, timeout=1.0)
                if done:
                    delta, get = get.result(), None
                elif self.serving:
                    continue
                else:
                    delta = Delta(error=self.error or "the engine is not running")
                finished = delta.finish_reason is not None or delta.error is not None or delta.bad_request is not None
                yield delta
                if finished:
                    return
        finally:
            if get is not None:
                get.cancel()
            if not finished:  # the caller went away, admitted or not yet: free its KV blocks
                self.abort(request_id)

    def submit(self, command: m.AddRequest | m.AbortRequest) -> None:
        """Queues a request whose deltas go to the sink, or aborts one (any thread)."""
        self.commands.put(command)

    def abort(self, request_id: str) -> None:
        """Aborts a request, admitted or still queued (any thread)."""
        self.commands.put(m.AbortRequest(request_id))

    async def record_trace(self, steps: int, timeout_s: float) -> dict:
        """Chrome trace of the next `steps` engine steps on every rank (AFD deployments only).
        Steps happen only while requests run: with none running or queued, NothingToRecord at
        once; after timeout_s what was recorded is returned, or NothingToRecord if no step ran."""
        if not self.rank.has_peers:
            self.rank.record_trace(steps)  # a monolithic rank raises why it has nothing to record
        future = asyncio.get_running_loop().create_future()
        self.commands.put(RecordTrace(steps, timeout_s, future))
        return await future

    def close(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self.commands.put(m.Shutdown())
        # Re-forming the AFD world, the loop is blocked in the rendezvous and has no peer to say
        # goodbye to: do not wait for it.
        self.thread.join(0 if self.reconnecting else timeout_s)

    # ---- loop thread
    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                failure = self._serve()
                if failure is not None:
                    self._recover(failure)
        except Exception as e:  # a dead FFN rank, a broken connector, ...: fail every request clearly
            self.error = f"{type(e).__name__}: {e}"
            log.error("engine loop stopped: %s", self.error)
            self._deliver([(rid, stream.target, Delta(error=self.error)) for rid, stream in self.streams.items()])
            self.streams.clear()
        finally:
            try:
                self.rank.close()
            except Exception as e:
                log.warning("shutdown: %s", e)

    def _serve(self) -> str | None:
        """Runs steps until stopped (None), or on a rank that can reconnect, until a step fails: why."""
        idle_wait = 0.0  # AFD: how long to wait for a request before the next idle round
        try:
            while not self._stopped.is_set():
                busy = self.engine.scheduler.has_work()
                # Idle, a monolithic engine waits for a request (in slices, to notice a stop); an AFD
                # rank's idle rounds pace its wait.
                self._drain(0.0 if busy else idle_wait if self.rank.has_peers else 0.05)
                if self.engine.scheduler.has_work():
                    self._publish(self._timed(self.engine.step))
                    idle_wait = 0.0
                elif self.rank.has_peers and not self._stopped.is_set():
                    all_idle = self._timed(self.rank.idle)
                    idle_wait = min(max(2 * idle_wait, IDLE_WAIT_S[0]), IDLE_WAIT_S[1]) if all_idle else 0.0
                scheduler = self.engine.scheduler
                self.metrics.set_scheduler(scheduler)
                blocks = scheduler.block_manager
                self.stat_logger.step(len(scheduler.running), len(scheduler.waiting), blocks.usage(),
                                      blocks.hits / max(blocks.queries, 1))
                self._finish_trace()
        except Exception as e:
            if not self.rank.has_peers:
                raise
            return f"{type(e).__name__}: {e}"  # only the text: the failed step's links must be freed
        return None

    def _timed(self, fn):
        self._step_started = time.monotonic()
        try:
            return fn()
        finally:
            self._step_started = None

    @property
    def stalled(self) -> str | None:
        """Why the engine looks stuck: a step running past STALL_LIMIT_S (any thread)."""
        started = self._step_started
        if started is None or time.monotonic() - started < STALL_LIMIT_S:
            return None
        what = "waiting for the FFN ranks" if self.rank.has_peers else "running"
        return f"the engine's current step has been {what} for {time.monotonic() - started:.0f} s"

    def _recover(self, failure: str) -> None:
        """Fails the requests that were mid-step (their step is lost), keeps the queued ones, and
        re-forms the AFD world until it works. Each attempt is bounded by the connector timeout;
        what is queued when one fails gets the error, so nothing waits longer than that."""
        self.reconnecting, self.error = True, failure
        log.error("engine step failed (%s); re-forming the AFD world", failure)
        self._fail(self.engine.scheduler.running, failure)
        if self._trace is not None:
            for future in self._trace[3]:
                future.get_loop().call_soon_threadsafe(future.set_exception, RuntimeError(failure))
            self._trace = None
        while not self._stopped.is_set():
            try:
                self.rank.reconnect()
            except Exception as e:
                log.error("re-forming the AFD world failed: %s", e)
                self._drain(0.0)
                self._fail(self.engine.scheduler.waiting, f"{failure}; re-forming the AFD world failed: {e}")
                continue
            log.warning("the AFD world re-formed; serving again")
            self.error, self.reconnecting = None, False
            return

    def _fail(self, seqs, error: str) -> None:
        failed = []
        for seq in list(seqs):
            self.engine.abort(seq.request_id)
            stream = self.streams.pop(seq.request_id, None)
            if stream is not None:
                failed.append((seq.request_id, stream.target, Delta(error=error)))
        self._deliver(failed)

    def _deliver(self, deltas: list[tuple[str, tuple | None, Delta]]) -> None:
        """Hands (request_id, target, delta) out: generate()'s queues, or the sink in one call."""
        if self.sink is not None:
            sunk = [(rid, d) for rid, target, d in deltas if target is None]
            if sunk:
                self.sink(sunk)
        for _, target, d in deltas:
            if target is not None:
                target[0].call_soon_threadsafe(target[1].put_nowait, d)

    def _drain(self, timeout_s: float) -> None:
        """Applies the queued commands, waiting up to timeout_s for the first."""
        try:
            command = self.commands.get(timeout=timeout_s) if timeout_s > 0 else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _finish_trace(self) -> None:
        if self._trace is None:
            return
        steps, timeout_s, deadline, futures = self._trace
        if self.rank.trace_remaining > 0 and time.monotonic() < deadline:
            return
        self._trace = None
        recorded = steps - self.rank.trace_remaining
        try:
            result = self.rank.collect_trace(timeout_s=10)
        except Exception as e:  # the futures must be answered; a dead link also ends the loop
            for future in futures:
                future.get_loop().call_soon_threadsafe(future.set_exception, e)
            raise
        if recorded == 0:
            result = NothingToRecord(f"no engine step ran within the trace's timeout of {timeout_s:g} s")
        for future in futures:
            future.get_loop().call_soon_threadsafe(
                future.set_exception if isinstance(result, Exception) else future.set_result, result)

    def _apply(self, command: Command) -> None:
        if isinstance(command, RecordTrace):
            self._start_trace(command)
        elif isinstance(command, (m.AddRequest, Listen)):
            request, target = (command.request, command.target) if isinstance(command, Listen) else (command, None)
            self._add(request, target)
        elif isinstance(command, m.AbortRequest):
            stream = self.streams.pop(command.request_id, None)
            self.engine.abort(command.request_id)
            if stream is not None:  # a caller still listening (a server's deadline) sees how it ended
                now = time.monotonic()
                self.metrics.finished(stream.seq, now - stream.arrival, now - (stream.first_token_at or now))
                self._deliver([(command.request_id, stream.target, _next_delta(stream))])

    def _start_trace(self, command: RecordTrace) -> None:
        future = command.future
        if self._trace is not None:  # a recording is under way: this caller shares it
            self._trace[3].append(future)
            return
        if not self.engine.scheduler.has_work():
            future.get_loop().call_soon_threadsafe(future.set_exception, NothingToRecord(
                "no request is running, so there is no step to record: send requests, then ask for the trace "
                "while they run (it records the next steps that run, for up to `timeout` seconds)"))
            return
        self.rank.record_trace(command.steps)
        self._trace = (command.steps, command.timeout_s, time.monotonic() + command.timeout_s, [future])

    def _add(self, request: m.AddRequest, target) -> None:
        try:
            seq = self.engine.add_request(request.prompt_token_ids, request.params, request.request_id)
        except AfdError as e:
            self._deliver([(request.request_id, target, Delta(bad_request=str(e)))])
            return
        except Exception as e:  # refuse this request only; the engine and the others go on
            log.exception("add_request failed")
            self._deliver([(request.request_id, target, Delta(bad_request=f"{type(e).__name__}: {e}"))])
            return
        self.streams[seq.request_id] = _Stream(target, seq, time.monotonic())
        self.metrics.requests.inc()

    def _publish(self, seqs: list[Sequence]) -> None:
        now = time.monotonic()
        deltas = []
        for seq in seqs:
            stream = self.streams.get(seq.request_id)
            if stream is None:
                continue
            if stream.first_token_at is None:
                stream.first_token_at = now
                self.metrics.ttft.observe(now - stream.arrival)
                self.stat_logger.prompt_tokens += len(seq.prompt_token_ids)
            self.metrics.generation_tokens.inc(len(seq.output_token_ids) - stream.sent_tokens)
            self.stat_logger.generation_tokens += len(seq.output_token_ids) - stream.sent_tokens
            delta = _next_delta(stream)
            if seq.finished:
                self.streams.pop(seq.request_id, None)
                self.metrics.finished(seq, now - stream.arrival, now - stream.first_token_at)
            deltas.append((seq.request_id, stream.target, delta))
        self._deliver(deltas)


def _next_delta(stream: _Stream) -> Delta:
    """What the stream's sequence gained since its last delta (and how it finished, if it did)."""
    seq = stream.seq
    delta = Delta(token_ids=seq.output_token_ids[stream.sent_tokens :], logprobs=seq.output_logprobs[stream.sent_tokens :],
                  finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_token_ids),
                  completion_tokens=len(seq.output_token_ids))
    stream.sent_tokens = len(seq.output_token_ids)
    return delta
