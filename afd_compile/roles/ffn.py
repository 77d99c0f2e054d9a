"""The FFN rank's loop: receive attention outputs, run FFN halves, send them back.

Each round it reads one header from every attention peer. Peers with a STEP send their
hidden states layer by layer, micro-batch by micro-batch, in the ping-pong order the
attention side uses; the FFN ranks agree (one all-reduce) on how many micro-batches the
round has, so the expert-parallel all-to-alls of every layer line up even on a rank whose
peers are idle. Idle peers get an ack at the end of the round.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from afd_compile.compilation import CompiledPerShape
from afd_compile.connector.base import AFDConnector, Flag, Kind, heartbeat
from afd_compile.connector.ops import Endpoint
from afd_compile.model.decoder import DeepseekV2
from afd_compile.roles.rendezvous import World
from afd_compile.trace import Tracer

log = logging.getLogger("afd.ffn")
# After SIGTERM an FFN rank serves on while its attention peers finish their streams (their
# servers' 30 s grace) and say goodbye; past this it stops anyway.
STOP_GRACE_S = 45.0


class GracefulStop:
    """SIGTERM (or a first Ctrl-C) on an FFN rank: while attention peers are connected
    (`serving`) it keeps serving them until they leave, as a planned stop of the deployment stops
    the attention ranks first and their last requests still need this rank; otherwise it exits at
    once. A second signal stops it now. Installed on the main thread; a SIGINT the supervisor's
    process group ignores stays ignored (the supervisor orders the stop)."""

    def __init__(self, rank: int):
        self.rank, self.requested, self.serving = rank, False, False
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.requested or not self.serving:
            raise SystemExit(0)
        self.requested = True
        log.warning("ffn rank %d: %s: serving the attention ranks until they leave (at most %.0f s; send it again "
                    "to stop now)", self.rank, signal.Signals(signum).name, STOP_GRACE_S)
        threading.Thread(target=self._deadline, name="afd-stop-deadline", daemon=True).start()

    def _deadline(self) -> None:
        time.sleep(STOP_GRACE_S)
        log.warning("ffn rank %d: attention ranks still connected %.0f s after the stop request; exiting",
                    self.rank, STOP_GRACE_S)
        logging.shutdown()
        os._exit(1)  # the main thread may be blocked in a transfer: no clean way out of it


class FFNWorker:
    def __init__(self, model: DeepseekV2, world: World, connector: AFDConnector, tracer: Tracer | None = None,
                 compile_decode: bool = False):
        self.model, self.world, self.connector = model, world, connector
        self.peers = list(range(len(world.topology.attention_peers(world.rank))))
        self.tracer = tracer or Tracer(f"ffn {world.rank}", world.global_rank)
        self.endpoint = Endpoint(connector, self.tracer, "ffn")
        self.hidden = model.cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.always_trace = self.tracer.enabled  # started with --trace: record every round
        # A decode round (every layer and micro-batch, with the transfers as ops) is one compiled
        # graph per tuple of micro-batch row counts, as on the attention side. Expert
        # parallelism's all-to-alls stay eager, so only a rank holding every expert compiles.
        self.decode_round = None
        if compile_decode and world.topology.num_ffn == 1:
            self.decode_round = CompiledPerShape(
                self._round, "ffn_round", self.device,
                lambda key: f"FFN decode round (micro-batch rows {', '.join(map(str, key))})")

    def _agree(self, m: int, trace: int, dump: int) -> tuple[int, int, int]:
        """The FFN ranks' common round: most micro-batches, and whether any peer asked for a
        trace or a dump (a dump id, 0 if none). One all-reduce."""
        if self.world.topology.num_ffn == 1:
            return m, trace, dump
        t = torch.tensor([m, trace, dump])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world.ffn_group)
        return int(t[0]), int(t[1]), int(t[2])

    def _publish_trace(self, dump_id: int) -> None:
        """Hands this rank's timeline to the attention rank that asked, through the store."""
        self.world.store.set(f"afd/trace/{dump_id}/ffn{self.world.rank}", json.dumps(self.tracer.to_json()))
        if not self.always_trace:
            self.tracer.events.clear()

    @torch.inference_mode()
    def run(self) -> None:
        try:
            self._serve()
        finally:
            self.endpoint.close()

    def _serve(self) -> None:
        active = set(self.peers)
        m = -1
        log.info("ffn rank %d ready: serves attention ranks %s", self.world.rank,
                 self.world.topology.attention_peers(self.world.rank))
        while active or self.world.topology.num_ffn > 1:
            # After a round without work the attention ranks wait for requests before their next
            # header: wait for it without polling hard.
            headers = {p: self.connector.recv_step(p, patient=m == 0) for p in sorted(active)}
            for p, h in headers.items():
                if h.kind is Kind.SHUTDOWN:
                    active.discard(p)
            steps = {p: h.tokens for p, h in headers.items() if h.kind is Kind.STEP}
            m, trace, dump = self._agree(
                max((len(t) for t in steps.values()), default=0) if active else -1,
                int(any(h.flags & Flag.TRACE for h in headers.values())),
                max((h.step for h in headers.values() if h.flags & Flag.DUMP), default=0))
            if m < 0:  # every FFN rank has lost all its peers
                break
            self.tracer.enabled = self.always_trace or bool(trace)
            if m > 0:
                decode = all(h.flags & Flag.DECODE for h in headers.values() if h.kind is Kind.STEP)
                self._run_round(steps, m, next(iter(headers.values())).step if headers else 0, decode)
            if dump:
                self._publish_trace(dump)
            for p, h in headers.items():
                if h.kind is Kind.COMPILE:
                    self._compile_for(p, h.tokens)
                if h.kind in (Kind.IDLE, Kind.COMPILE):
                    self.connector.send_ack(p, flags=Flag.IDLE if m == 0 else Flag(0))
            self.connector.flush()
        log.info("ffn rank %d: all attention peers left; exiting", self.world.rank)

    def _run_round(self, steps: dict[int, tuple[int, ...]], m: int, step: int, decode: bool) -> None:
        # Micro-batch k is the concatenation of every busy peer's k-th micro-batch.
        plan = [[(p, t[k]) for p, t in steps.items() if k < len(t) and t[k] > 0] for k in range(m)]
        rows = tuple(sum(n for _, n in parts) for parts in plan)
        if not (decode and self.decode_round is not None):
            self.endpoint.start(step, plan, decode)
            self._call(self._round, rows)
            return
        if rows not in self.decode_round:
            # A shape no COMPILE request announced (several peers' micro-batches together): the
            # peers wait through the compilation, within their connector timeout.
            self._compile(rows)
        self.endpoint.start(step, plan)
        self._call(lambda r: self.decode_round(r, r), rows)

    def _compile_for(self, peer: int, rows: tuple[int, ...]) -> None:
        """A COMPILE request: compiles the decode round of these rows, telling the peer BUSY
        every second meanwhile."""
        if self.decode_round is not None and rows not in self.decode_round:
            with heartbeat(lambda: self.connector.send_ack(peer, Kind.BUSY)):
                self._compile(rows)

    def _compile(self, rows: tuple[int, ...]) -> None:
        """Compiles (and runs once) the decode round of these rows on loopback links."""
        self.endpoint.start(0, [[(0, n)] for n in rows])
        with self.tracer.compile_span(shape=self.decode_round.describe(rows)), \
                self.endpoint.loopback(self.hidden, self.dtype, self.device):
            self.decode_round(rows, rows)

    def _call(self, round_fn, rows: tuple[int, ...]) -> None:
        try:
            round_fn(rows)
        except Exception:
            self.endpoint.raise_error()  # a transfer failed inside the graph: its own error
            raise

    def _round(self, rows: tuple[int, ...]) -> torch.Tensor:
        """Every layer for every micro-batch (rows[k] tokens each) in the attention side's
        ping-pong order. Free of Python side effects, so it compiles into one graph: the transfers
        are ops, each taking the previous one's result (`link`) so they keep this order."""
        ep = self.endpoint.id
        link = torch.empty(0, dtype=self.dtype, device=self.device)
        for layer, ffn_half in enumerate(self.model.ffn_halves):
            for k, n in enumerate(rows):
                if n:
                    link = x = torch.ops.afd.recv_attn_output(link, ep, n, self.hidden, layer, k)
                else:  # no peer sent micro-batch k; with expert parallelism this rank still joins its all-to-alls
                    x = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
                y = ffn_half(x)
                if n:
                    link = torch.ops.afd.send_ffn_output(y, link, ep, layer, k)
        return link
