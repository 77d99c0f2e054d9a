"""The engine core process of `afd serve`: the engine's busy loop (scheduler, model runner,
sampler; on AFD the attention rank's loop) away from the API process, so HTTP, JSON, SSE,
tokenization and detokenization never take the interpreter from a step (vLLM V1's EngineCore,
for the same reason).

It builds the engine (AsyncEngine on its engine thread: load, compile, warm up), says Ready, then
relays: AddRequest / AbortRequest -> the engine's command queue; each step's deltas -> one
Outputs message, sent by the engine thread itself on a socket of its own (one message a step,
not a wake-up per request); StartTrace / GetMetrics -> answered by id; engine state changes ->
EngineState. Its main thread runs only this asyncio relay (no torch), so the engine thread alone
runs torch.

It ignores SIGINT and SIGTERM: the API process stops it with Shutdown after its own graceful
shutdown, and it is killed if the API process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time

import torch
import zmq
import zmq.asyncio

from afd_compile import compile_cache
from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.engine.llm_engine import LLMEngine
from afd_compile.engine.rank import Rank
from afd_compile.errors import AfdError, NothingToRecord
from afd_compile.serve import messages as m
from afd_compile.serve.async_engine import AsyncEngine
from afd_compile.serve.metrics import Metrics

log = logging.getLogger("afd.engine_core")
STATE_POLL_S = 0.02
RESERVED_CPUS_ENV = "AFD_CPU_NUM_OF_RESERVED_CPU"  # vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU


def reserve_cpus() -> None:
    """Leaves cores to the API process (HTTP, SSE, detokenizing) and its clients, unless
    OMP_NUM_THREADS is set: the engine's OpenMP workers spin between parallel loops and would
    take them. vLLM's CPU backend reserves one core; here one is reserved by default from 4
    cores on, none below: on 2 cores, half the cores is half a wide model's read bandwidth.
    Measured on 2 cores, 16 streaming clients: the demo model 4.6k -> 7.1k served tok/s with
    one reserved, the hidden-512 shape 1.40k -> 1.16k. Called on the engine thread before
    anything compiles (inductor bakes the thread count into its kernels)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0))
    reserved = int(os.environ.get(RESERVED_CPUS_ENV, "1" if cores >= 4 else "0"))
    torch.set_num_threads(max(1, cores - reserved))


def make_async_engine(engine_cfg: EngineConfig, afd: AFDConfig | None, warmup: bool) -> tuple[AsyncEngine, str]:
    """The engine, built on its own thread (see AsyncEngine). warmup: compiles every decode
    shape before the engine serves (see LLMEngine.warm_up)."""
    metrics = Metrics()

    def build() -> tuple[LLMEngine, Rank]:  # on the engine thread
        reserve_cpus()
        start = time.monotonic()
        if afd is None:
            engine, rank = LLMEngine(engine_cfg), Rank()
        else:
            from afd_compile.roles.worker import attention_engine

            engine, rank = attention_engine(engine_cfg, afd)
        loaded = time.monotonic()
        log.info("start-up: model loaded%s in %.1f s", "" if afd is None else " and AFD world formed", loaded - start)
        if warmup:
            engine.warm_up()
            log.info("start-up: every decode shape compiled in %.1f s (inductor cache %s)", time.monotonic() - loaded,
                     os.environ.get(compile_cache.ENV, "inductor's default"))
        # after the warm-up: its waits are not the deployment's latency
        rank.observe_waits(lambda layer, s: metrics.connector_latency.labels(str(layer)).observe(s))
        return engine, rank

    return AsyncEngine(build, metrics), "monolithic" if afd is None else f"AFD {afd.topology}"


def run(engine_cfg: EngineConfig, afd: AFDConfig | None, warmup: bool, to_core: str, from_core: str,
        log_level: str) -> None:
    """The process's entry point (multiprocessing, spawned by engine_client.EngineClient)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        async_engine, backend = make_async_engine(engine_cfg, afd, warmup)
    except AfdError as e:
        _say(from_core, m.StartupFailed(str(e), bad_input=True))
        return
    except Exception as e:  # the API process prints it; the traceback stays in this log
        log.exception("the engine could not be built")
        _say(from_core, m.StartupFailed(f"{type(e).__name__}: {e}", bad_input=False))
        return
    relay = _Relay(async_engine, backend, to_core, from_core)
    try:
        asyncio.run(relay.serve())
    finally:
        async_engine.close()
        relay.step_outbox.close(linger=1000)


def _say(address: str, message) -> None:
    """One message, delivered before this process exits."""
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as sock:
        sock.connect(address)
        sock.send(m.encode(message))
        sock.close(linger=5000)


class _Relay:
    def __init__(self, engine: AsyncEngine, backend: str, to_core: str, from_core: str):
        self.engine, self.backend = engine, backend
        self.ctx = zmq.asyncio.Context.instance()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.connect(to_core)
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.connect(from_core)
        # The engine thread's own socket (a ZMQ socket belongs to one thread); PULL merges both.
        self.step_outbox = zmq.Context().socket(zmq.PUSH)
        self.step_outbox.connect(from_core)
        engine.sink = self.send_step

    async def send(self, message) -> None:
        await self.outbox.send(m.encode(message))

    async def serve(self) -> None:
        await self.send(m.Ready(self.engine.max_model_len, self.backend))
        watcher = asyncio.create_task(self.watch_state())
        try:
            while True:
                try:
                    message = m.decode(await self.inbox.recv(), "core")
                except m.ProtocolError as e:
                    log.error("%s", e)
                    continue
                if isinstance(message, m.Shutdown):
                    return
                self.handle(message)
        finally:
            watcher.cancel()
            self.inbox.close(linger=0)
            self.outbox.close(linger=1000)

    def send_step(self, deltas) -> None:
        """The sink: on the engine thread, one step's deltas as one message."""
        self.step_outbox.send(m.encode(m.Outputs([
            m.Output(rid, d.token_ids, d.logprobs, d.finish_reason, d.prompt_tokens, d.completion_tokens, d.error,
                     d.bad_request) for rid, d in deltas])))

    def handle(self, message) -> None:
        if isinstance(message, (m.AddRequest, m.AbortRequest)):
            self.engine.submit(message)
        elif isinstance(message, m.StartTrace):
            asyncio.create_task(self.trace(message))
        elif isinstance(message, m.GetMetrics):
            asyncio.create_task(self.send(m.Metrics(message.ask_id, self.engine.metrics.render())))

    async def trace(self, request: m.StartTrace) -> None:
        try:
            result = await self.engine.record_trace(request.steps, request.timeout_s)
        except AfdError as e:
            await self.send(m.TraceDone(request.ask_id, None, str(e), 409 if isinstance(e, NothingToRecord) else 400))
        except Exception as e:
            await self.send(m.TraceDone(request.ask_id, None, f"{type(e).__name__}: {e}"))
        else:
            await self.send(m.TraceDone(request.ask_id, result, None))

    async def watch_state(self) -> None:
        """Sends the engine's state whenever it changes (a failed step, a stall, a re-formed world)."""
        last = None
        while True:
            # stalled counts whole seconds: a message a second while a stall lasts, not one a poll
            state = (self.engine.healthy, self.engine.reconnecting, self.engine.error, self.engine.stalled)
            if state != last:
                await self.send(m.EngineState(*state))
                last = state
            await asyncio.sleep(STATE_POLL_S)
