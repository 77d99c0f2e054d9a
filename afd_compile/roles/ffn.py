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
import time

import torch
import torch._dynamo
import torch.distributed as dist

from afd_compile.connector.base import AFDConnector, Flag, Kind
from afd_compile.engine.model_runner import call_warm, compile_options
from afd_compile.model.decoder import DeepseekV2
from afd_compile.roles.rendezvous import World
from afd_compile.trace import Tracer

log = logging.getLogger("afd.ffn")

IDLE_BACKOFF_S = (0.0005, 0.02)  # an all-idle round waits this long, doubling up to the max


def _ffn_layer(half, x: torch.Tensor) -> torch.Tensor:
    return half(x)


class FFNWorker:
    def __init__(self, model: DeepseekV2, world: World, connector: AFDConnector, tracer: Tracer | None = None,
                 compile_decode: bool = False, batch_buckets: tuple[int, ...] = ()):
        self.model, self.world, self.connector = model, world, connector
        self.peers = list(range(len(world.topology.attention_peers(world.rank))))
        self.tracer = tracer or Tracer(f"ffn {world.rank}", world.global_rank)
        self.hidden = model.cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.always_trace = self.tracer.enabled  # started with --trace: record every round
        # Decode rounds have bucketed row counts: one compiled graph per count, shared by all
        # layers (weights are graph inputs), as on the attention side. Expert parallelism's
        # all-to-alls stay eager, so only a rank holding every expert compiles.
        self.decode_layer = None
        self.warm_rows: set[int] = set()  # row counts whose decode graphs (dense and MoE) exist
        if compile_decode and world.topology.num_ffn == 1:
            kinds = len({type(half.mlp) for half in model.ffn_halves})  # dense and MoE layers: a graph each
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       kinds * len(batch_buckets) * len(self.peers) + 1)
            self.decode_layer = torch.compile(_ffn_layer, dynamic=False, fullgraph=True,
                                              options=compile_options(self.device))

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
        active = set(self.peers)
        idle_wait = IDLE_BACKOFF_S[0]
        log.info("ffn rank %d ready: serves attention ranks %s", self.world.rank,
                 self.world.topology.attention_peers(self.world.rank))
        while active or self.world.topology.num_ffn > 1:
            headers = {p: self.connector.recv_step(p) for p in sorted(active)}
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
            if m == 0:
                time.sleep(idle_wait)
                idle_wait = min(idle_wait * 2, IDLE_BACKOFF_S[1])
            else:
                idle_wait = IDLE_BACKOFF_S[0]
                decode = all(h.flags & Flag.DECODE for h in headers.values() if h.kind is Kind.STEP)
                self._run_round(steps, m, next(iter(headers.values())).step if headers else 0, decode)
            if dump:
                self._publish_trace(dump)
            for p, h in headers.items():
                if h.kind is Kind.IDLE:
                    self.connector.send_ack(p)
            self.connector.flush()
        log.info("ffn rank %d: all attention peers left; exiting", self.world.rank)

    def _run_round(self, steps: dict[int, tuple[int, ...]], m: int, step: int, decode: bool) -> None:
        compiled = decode and self.decode_layer is not None
        seen: set[int] = set()
        for layer, ffn_half in enumerate(self.model.ffn_halves):
            for k in range(m):
                with self.tracer.span("wait", "ffn", layer=layer, micro_batch=k, step=step):
                    parts = [(p, self.connector.recv_attn_output(p, t[k], k))
                             for p, t in steps.items() if k < len(t) and t[k] > 0]
                if not parts:
                    x = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
                elif len(parts) == 1:  # one peer's micro-batch is used as received
                    x = parts[0][1]
                else:
                    x = torch.cat([x for _, x in parts])
                with self.tracer.span("ffn", "ffn", layer=layer, micro_batch=k, step=step, tokens=x.shape[0]):
                    rows = x.shape[0]
                    if not compiled or not rows:
                        y = ffn_half(x)
                    elif rows in self.warm_rows:
                        y = call_warm(self.decode_layer, ffn_half, x)
                    else:
                        y = self.decode_layer(ffn_half, x)
                        seen.add(rows)
                with self.tracer.span("send", "ffn", layer=layer, micro_batch=k, step=step):
                    for (p, _), out in zip(parts, y.split([x.shape[0] for _, x in parts])):
                        self.connector.send_ffn_output(p, out, k)
        self.warm_rows |= seen  # every layer kind has now compiled for these row counts
