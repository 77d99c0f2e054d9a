"""The attention rank's model runner: embeddings, attention halves, KV cache and lm_head here;
every layer's FFN half on the FFN ranks, reached through the connector.

Same interface as engine.ModelRunner, so the scheduler, sampler and server are unchanged.
A batch is cut into micro-batches that flow through the layers staggered (MegaScale-Infer's
ping-pong): while the FFN ranks compute micro-batch k of layer l, this rank computes the
attention of micro-batch k+1, and it waits for micro-batch k's FFN output only when layer
l+1 needs it.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from afd_compile.config import EngineConfig
from afd_compile.connector.base import MAX_MICRO_BATCHES, AFDConnector, Flag, Kind, StepHeader
from afd_compile.engine.model_runner import call_warm, compile_options
from afd_compile.engine.sequence import Sequence
from afd_compile.errors import AfdError
from afd_compile.model.attention_half import AttentionHalf, AttentionInputs
from afd_compile.model.decoder import DeepseekV2
from afd_compile.trace import Tracer


def _attention_layer(half: AttentionHalf, h: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
    return half(h, inp)


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, L]
    inp: AttentionInputs
    last_idx: torch.Tensor  # [b]
    rows: int  # real (unpadded) rows
    sent: torch.Tensor | None  # flat indices of the tokens sent to the FFN; None = all (decode)

    @property
    def num_sent(self) -> int:
        return self.tokens.numel() if self.sent is None else self.sent.numel()


class AFDModelRunner:
    def __init__(self, model: DeepseekV2, config: EngineConfig, max_model_len: int, connector: AFDConnector,
                 micro_batches: int = 1, tracer: Tracer | None = None, world=None):
        if not 1 <= micro_batches <= MAX_MICRO_BATCHES:
            raise AfdError(f"micro_batches must be in 1..{MAX_MICRO_BATCHES}, got {micro_batches}")
        self.model, self.config, self.max_model_len = model, config, max_model_len
        self.connector, self.micro_batches = connector, micro_batches
        self.tracer = tracer or Tracer("attention", 0)
        model.setup_caches(config.max_num_seqs, max_model_len)
        self.scratch = model.scratch_slot
        self.device = model.embed_tokens.weight.device
        # One graph per micro-batch bucket, shared by all layers: the layer's weights are
        # graph inputs (dynamo inlines nn.Modules), not constants baked into 60 graphs.
        self.decode_attention = _attention_layer if config.enforce_eager else torch.compile(
            _attention_layer, dynamic=False, fullgraph=True, options=compile_options(self.device))
        self.decode_graphs = None
        self._warm: set[int] = set()
        if self.device.type == "cuda" and not config.enforce_eager:
            from afd_compile.roles.cuda_graph import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self, self.decode_attention)
        self.steps = itertools.count()
        self.wait_observer = None  # (layer, seconds) of each wait for FFN output, e.g. for /metrics
        self.world = world  # rendezvous store and topology, for collecting the FFN ranks' timelines
        self.always_trace = self.tracer.enabled  # started with --trace: record every step
        self.trace_remaining = 0  # steps still to record for record_trace()

    # ---- building micro-batches
    def _micro_batch(self, rows: list[tuple[list[int], int, int]], width: int, n_ctx: int, pack: bool) -> MicroBatch:
        """rows: (token ids, first position, slot) per sequence, padded to `width` tokens and,
        for decode, to the row bucket; padding goes to the scratch slot. `pack`: only real
        tokens travel to the FFN (prefill); decode sends the whole static bucket."""
        b = len(rows)
        # Filled as numpy arrays: a torch op per row costs microseconds, tens per row per step.
        tokens = np.zeros((b, width), dtype=np.int64)
        positions = np.zeros((b, width), dtype=np.int64)
        write_slots = np.full((b, width), self.scratch, dtype=np.int64)
        read_slots = np.full(b, self.scratch, dtype=np.int64)
        last_idx = np.zeros(b, dtype=np.int64)
        real = 0
        for i, row in enumerate(rows):
            if row is None:
                continue
            ids, start, slot = row
            n = len(ids)
            tokens[i, :n] = ids
            positions[i, :n] = range(start, start + n)
            write_slots[i, :n], read_slots[i], last_idx[i] = slot, slot, n - 1
            real += 1
        sent = torch.from_numpy(np.flatnonzero(write_slots != self.scratch)) if pack else None
        tokens, positions, write_slots, read_slots, last_idx = (
            torch.from_numpy(t).to(self.device) for t in (tokens, positions, write_slots, read_slots, last_idx))
        inp = self.model.attention_inputs(positions, write_slots, read_slots, n_ctx)
        return MicroBatch(tokens, inp, last_idx, real, None if sent is None else sent.to(self.device))

    def _split(self, n: int, bucketed: bool) -> tuple[list[range], int]:
        size = math.ceil(n / self.micro_batches)
        if bucketed:
            size = self.config.bucket(size)
        return [range(i, min(i + size, n)) for i in range(0, n, size)], size

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], chunk_lens: list[int]) -> torch.Tensor:
        parts, _ = self._split(len(seqs), bucketed=False)
        mbs = []
        for part in parts:
            rows = [(seqs[i].prompt_token_ids[seqs[i].num_computed : seqs[i].num_computed + chunk_lens[i]],
                     seqs[i].num_computed, seqs[i].slot) for i in part]
            n_ctx = max(seqs[i].num_computed + chunk_lens[i] for i in part)
            mbs.append(self._micro_batch(rows, max(chunk_lens[i] for i in part), n_ctx, pack=True))
        return self._pipeline(mbs, _attention_layer)  # prefill shapes vary: eager

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        parts, size = self._split(len(seqs), bucketed=True)
        mbs = []
        for part in parts:
            rows = [([seqs[i].last_token_id], len(seqs[i]) - 1, seqs[i].slot) for i in part]
            mbs.append(self._micro_batch(rows + [None] * (size - len(rows)), 1, self.max_model_len, pack=False))
        if self.decode_graphs is not None:
            return self.decode_graphs(mbs)
        if self.config.enforce_eager:
            return self._pipeline(mbs, self.decode_attention, Flag.DECODE)
        self._warm_up(size)  # every layer shares this size's graph, which now exists
        return call_warm(self._pipeline, mbs, self.decode_attention, Flag.DECODE)

    def _warm_up(self, rows: int) -> None:
        """Compiles the decode graph for a new micro-batch size before the step header goes out:
        the FFN ranks would otherwise wait through the compilation (seconds on CPU), racing the
        connector timeout. Runs on the scratch slot only."""
        if rows in self._warm:
            return
        dummy = self._micro_batch([None] * rows, 1, self.max_model_len, pack=False)
        half = self.model.attention_halves[0]
        self.decode_attention(half, self.model.embed_tokens(dummy.tokens), dummy.inp)
        self._warm.add(rows)

    # ---- the ping-pong pipeline
    def _pipeline(self, mbs: list[MicroBatch], attention, flags: Flag = Flag(0)) -> torch.Tensor:
        step = next(self.steps)
        self.connector.send_step(StepHeader(Kind.STEP, step, tuple(mb.num_sent for mb in mbs),
                                            self._step_flags() | flags))
        logits = self._layers(mbs, attention, step)
        self._step_traced()
        return torch.cat([x[: mb.rows] for x, mb in zip(logits, mbs)]).cpu()

    # ---- live traces of the running deployment
    def record_trace(self, steps: int) -> None:
        """Records the next `steps` steps on this rank and on the FFN ranks it reaches."""
        self.tracer.events.clear()
        self.tracer.enabled, self.trace_remaining = True, steps

    def _step_flags(self) -> Flag:
        return Flag.TRACE if self.trace_remaining > 0 else Flag(0)

    def _step_traced(self) -> None:
        if self.trace_remaining > 0:
            self.trace_remaining -= 1
            self.tracer.enabled = self.always_trace or self.trace_remaining > 0

    def collect_trace(self, timeout_s: float) -> dict:
        """This rank's recorded events merged with every FFN rank's, as Chrome trace JSON."""
        dump_id = time.time_ns() % (1 << 62)
        self.connector.send_step(StepHeader(Kind.IDLE, dump_id, flags=Flag.DUMP))
        self.connector.recv_ack()
        keys = [f"afd/trace/{dump_id}/ffn{j}" for j in range(self.world.topology.num_ffn)]
        self.world.store.wait(keys, datetime.timedelta(seconds=timeout_s))
        events = self.tracer.to_json()["traceEvents"]
        for key in keys:
            events += json.loads(self.world.store.get(key))["traceEvents"]
        self.trace_remaining = 0
        self.tracer.enabled = self.always_trace
        if not self.always_trace:
            self.tracer.events.clear()
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def _layers(self, mbs: list[MicroBatch], attention, step: int) -> list[torch.Tensor]:
        """Every layer for every micro-batch, staggered; per micro-batch logits [b, vocab].
        Host-side sync free, so on CUDA it can be captured in a graph (see cuda_graph.py)."""
        model, trace = self.model, self.tracer
        hs = [model.embed_tokens(mb.tokens) for mb in mbs]
        for layer, half in enumerate(model.attention_halves):
            for k, mb in enumerate(mbs):
                if layer > 0:
                    with trace.span("wait", "attention", layer=layer - 1, micro_batch=k, step=step):
                        hs[k] = self._receive(hs[k], mb, k, layer - 1)
                with trace.span("attention", "attention", layer=layer, micro_batch=k, step=step):
                    hs[k] = attention(half, hs[k], mb.inp)
                with trace.span("send", "attention", layer=layer, micro_batch=k, step=step):
                    flat = hs[k].flatten(0, 1)
                    self.connector.send_attn_output(flat if mb.sent is None else flat[mb.sent], k)
        logits = []
        for k, mb in enumerate(mbs):
            with trace.span("wait", "attention", layer=len(model.attention_halves) - 1, micro_batch=k, step=step):
                h = self._receive(hs[k], mb, k, len(model.attention_halves) - 1)
            logits.append(model.logits(h, mb.last_idx))
        self.connector.flush()
        return logits

    def _receive(self, h: torch.Tensor, mb: MicroBatch, k: int, layer: int) -> torch.Tensor:
        """The FFN output of micro-batch k in h's [b, L, hidden] layout (padding rows keep h's)."""
        start = time.perf_counter()
        out = self.connector.recv_ffn_output(k)
        if self.wait_observer is not None:
            self.wait_observer(layer, time.perf_counter() - start)
        if mb.sent is None:
            return out.view_as(h)
        return h.flatten(0, 1).index_copy(0, mb.sent, out).view_as(h)

    # ---- between steps
    def idle(self) -> None:
        """Tells the FFN ranks this rank has nothing this round and waits for their ack."""
        self.connector.send_step(StepHeader(Kind.IDLE))
        self.connector.recv_ack()

    def reconnect(self, connector: AFDConnector, world) -> None:
        """Continues on a new generation's links after the old ones broke. The KV cache stays;
        the requests that were mid-step when the links broke are the server's to fail."""
        self.connector, self.world = connector, world
        self.trace_remaining, self.tracer.enabled = 0, self.always_trace
        if self.decode_graphs is not None:  # captured graphs replay transfers on the old links
            from afd_compile.roles.cuda_graph import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self, self.decode_attention)

    def shutdown(self) -> None:
        """Tells the FFN ranks this rank is leaving, then releases the links."""
        try:
            self.connector.send_step(StepHeader(Kind.SHUTDOWN))
            self.connector.flush()
        finally:
            self.connector.close()
