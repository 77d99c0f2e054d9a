"""The attention rank's model runner: embeddings, attention halves, KV cache and lm_head here;
every layer's FFN half on the FFN ranks, reached through the connector.

Same interface as engine.ModelRunner, so the scheduler, sampler and server are unchanged.
A batch is cut into micro-batches that flow through the layers staggered (MegaScale-Infer's
ping-pong): while the FFN ranks compute micro-batch k of layer l, this rank computes the
attention of micro-batch k+1, and it waits for micro-batch k's FFN output only when layer
l+1 needs it.

A decode step (all layers, micro-batches and transfers) is one torch.compile'd graph on CPU,
the transfers being ops (connector/ops.py); on CUDA it is captured as one CUDA graph
(cuda_graph.py). Prefill shapes vary with every prompt: eager.
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

from afd_compile.compilation import CompiledPerShape, compile_options, context_bucket, context_spans
from afd_compile.config import EngineConfig
from afd_compile.connector.base import AFDConnector, Flag, Kind, StepHeader, heartbeat
from afd_compile.connector.ops import Endpoint
from afd_compile.engine.model_inputs import DecodeRows
from afd_compile.engine.sequence import Sequence
from afd_compile.model.attention_half import AttentionHalf, AttentionInputs
from afd_compile.model.decoder import DeepseekV2
from afd_compile.model.kv_cache import slot_rows
from afd_compile.trace import Tracer


def _attention_layer(half: AttentionHalf, h: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
    return half(h, inp)


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, L]
    positions: torch.Tensor  # [b, L]
    slot_mapping: torch.Tensor  # [b, L]
    block_tables: torch.Tensor  # [b, W]
    last_idx: torch.Tensor  # [b]
    n_ctx: int
    rows: int  # real (unpadded) rows
    sent: torch.Tensor | None  # flat indices of the tokens sent to the FFN; None = all (decode)

    @property
    def num_sent(self) -> int:
        return self.tokens.numel() if self.sent is None else self.sent.numel()


class AFDModelRunner:
    def __init__(self, model: DeepseekV2, config: EngineConfig, max_model_len: int, connector: AFDConnector,
                 micro_batches: int = 1, tracer: Tracer | None = None, world=None):
        self.model, self.config, self.max_model_len = model, config, max_model_len
        self.micro_batches = micro_batches
        self.tracer = tracer or Tracer("attention", 0)
        self.endpoint = Endpoint(connector, self.tracer, "attention")
        self.scratch = model.scratch_block  # the KV cache is set up (LLMEngine.__init__)
        self.device = model.embed_tokens.weight.device
        self.decode_step = self.decode_graphs = None
        if config.enforce_eager:
            pass  # eager decode: _layers as written
        elif self.device.type == "cuda":
            from afd_compile.roles.cuda_graph import DecodeGraphs

            # One attention graph per micro-batch bucket and context bucket, shared by all layers
            # (their weights are graph inputs), inside a CUDA graph of the whole step; guarded (the
            # engine raised dynamo's recompile limit for the bucket pairs).
            self.decode_attention = torch.compile(_attention_layer, dynamic=False, fullgraph=True,
                                                  options=compile_options(self.device))
            self.decode_graphs = DecodeGraphs(self, self.decode_attention)
        else:  # one graph per decode shape (micro-batch count, bucket), its context span dynamic
            self.decode_step = CompiledPerShape(
                self._layers, "attention_step", self.device,
                lambda key: f"attention decode step ({key[0]} micro-batch{'es' if key[0] > 1 else ''} of {key[1]} rows, "
                            f"context up to {max_model_len} dynamic)")
            self.spans = context_spans(max_model_len, model.block_size)
        # Per (micro-batch count, bucket): the rows (token, position, cache row, block table) of every
        # micro-batch, rewritten in place each step, and the micro-batches viewing their device
        # copy: each shape's compiled step is always given the same tensors.
        self._decode_inputs: dict[tuple[int, int], tuple[list[DecodeRows], list[MicroBatch]]] = {}
        self.steps = itertools.count()
        self.world = world  # rendezvous store and topology, for collecting the FFN ranks' timelines
        self.always_trace = self.tracer.enabled  # started with --trace: record every step
        self.trace_remaining = 0  # steps still to record for record_trace()

    @property
    def connector(self) -> AFDConnector:
        return self.endpoint.connector

    @property
    def wait_observer(self):
        return self.endpoint.wait_observer

    @wait_observer.setter
    def wait_observer(self, fn) -> None:
        """(layer, seconds) of each wait for FFN output, e.g. for /metrics."""
        self.endpoint.wait_observer = fn

    # ---- building micro-batches
    def _micro_batch(self, rows: list[tuple[list[int], int, list[int]]], width: int, n_ctx: int) -> MicroBatch:
        """A prefill micro-batch: rows (token ids, first position, block table) per sequence,
        padded to `width` tokens (padding to the scratch block); only real tokens travel to the FFN."""
        b, bs, scratch = len(rows), self.model.block_size, self.scratch
        # Filled as numpy arrays: a torch op per row costs microseconds, tens per row per step.
        tokens = np.zeros((b, width), dtype=np.int64)
        positions = np.zeros((b, width), dtype=np.int64)
        slot_mapping = np.full((b, width), scratch * bs, dtype=np.int64)
        tables = np.full((b, self.model.block_table_width), scratch, dtype=np.int64)
        real, last_idx = np.zeros((b, width), dtype=bool), np.zeros(b, dtype=np.int64)
        for i, (ids, start, table) in enumerate(rows):
            n = len(ids)
            tokens[i, :n] = ids
            positions[i, :n] = range(start, start + n)
            slot_mapping[i, :n] = slot_rows(table, start, n, bs)
            tables[i, : len(table)] = table
            real[i, :n], last_idx[i] = True, n - 1
        sent = torch.from_numpy(np.flatnonzero(real))
        tensors = (torch.from_numpy(t).to(self.device) for t in (tokens, positions, slot_mapping, tables, last_idx))
        return MicroBatch(*tensors, n_ctx=n_ctx, rows=b, sent=sent.to(self.device))

    def _decode_batch(self, seqs: list[Sequence]) -> list[MicroBatch]:
        """The step's micro-batches, each padded to one bucket (padding rows on the scratch block),
        all attending over the context bucket of the longest sequence."""
        size = self.config.bucket(math.ceil(len(seqs) / self.micro_batches))
        m = math.ceil(len(seqs) / size)
        if (m, size) not in self._decode_inputs:
            zeros = torch.zeros(size, dtype=torch.long, device=self.device)
            staged = [DecodeRows(size, self.model, self.device) for _ in range(m)]
            mbs = [MicroBatch(*rows.inputs, zeros, n_ctx=self.max_model_len, rows=0, sent=None) for rows in staged]
            self._decode_inputs[m, size] = staged, mbs
        staged, mbs = self._decode_inputs[m, size]
        n_ctx = context_bucket(max(len(s) for s in seqs), self.max_model_len)
        for k, (rows, mb) in enumerate(zip(staged, mbs)):
            part = seqs[k * size : (k + 1) * size]
            rows.stage(part)
            mb.rows, mb.n_ctx = len(part), n_ctx
        return mbs

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], chunk_lens: list[int]) -> torch.Tensor:
        size = math.ceil(len(seqs) / self.micro_batches)
        mbs = []
        for part in (range(i, min(i + size, len(seqs))) for i in range(0, len(seqs), size)):
            rows = [(seqs[i].token_ids[seqs[i].num_computed : seqs[i].num_computed + chunk_lens[i]],
                     seqs[i].num_computed, seqs[i].block_table) for i in part]
            n_ctx = max(seqs[i].num_computed + chunk_lens[i] for i in part)
            mbs.append(self._micro_batch(rows, max(chunk_lens[i] for i in part), n_ctx))
        return self._pipeline(mbs, self._layers, _attention_layer)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        mbs = self._decode_batch(seqs)
        if self.decode_graphs is not None:
            return self.decode_graphs(mbs)
        if self.decode_step is None:
            return self._pipeline(mbs, self._layers, _attention_layer, Flag.DECODE)
        key, span = (len(mbs), mbs[0].tokens.shape[0]), self.spans[mbs[0].n_ctx]
        if key not in self.decode_step:
            self._warm_up(key, mbs, span)
        return self._pipeline(mbs, lambda *a: self.decode_step(key, *a, span), _attention_layer, Flag.DECODE)

    def _warm_up(self, key: tuple[int, int], mbs: list[MicroBatch], span: torch.Tensor) -> None:
        """Compiles the step for these shapes on loopback links and the scratch block only, before
        its header goes out, and has the FFN ranks compile their round meanwhile (a COMPILE
        request): otherwise each side would wait through the other's compilation (tens of
        seconds on CPU) mid-step. While it compiles, this rank keeps the links busy with idle
        rounds, so the FFN ranks see a live peer, not silence outlasting the connector timeout."""
        saved = [(mb.slot_mapping.clone(), mb.block_tables.clone()) for mb in mbs]
        for mb in mbs:
            mb.slot_mapping.fill_(self.scratch * self.model.block_size)
            mb.block_tables.fill_(self.scratch)
        links = self.connector  # the real ones: the step compiles on loopback links
        requests = iter([StepHeader(Kind.COMPILE, tokens=tuple(mb.num_sent for mb in mbs), flags=Flag.DECODE)])

        def beat():  # the COMPILE request, then idle rounds; each waits for the FFN ranks' ack
            links.send_step(next(requests, StepHeader(Kind.IDLE)))
            links.recv_ack()

        with self.tracer.compile_span(shape=self.decode_step.describe(key)), heartbeat(beat), \
                self.endpoint.loopback(self.model.cfg.hidden_size, self.model.embed_tokens.weight.dtype, self.device):
            self.decode_step(key, mbs, _attention_layer, span)
        for mb, (slots, tables) in zip(mbs, saved):
            mb.slot_mapping.copy_(slots)
            mb.block_tables.copy_(tables)

    # ---- the ping-pong pipeline
    def _pipeline(self, mbs: list[MicroBatch], layers, attention, flags: Flag = Flag(0)) -> torch.Tensor:
        step = next(self.steps)
        self.connector.send_step(StepHeader(Kind.STEP, step, tuple(mb.num_sent for mb in mbs),
                                            self._step_flags() | flags))
        self.endpoint.start(step, decode=bool(flags & Flag.DECODE))
        try:
            logits = layers(mbs, attention)
        except Exception:
            self.endpoint.raise_error()  # a transfer failed inside the graph: its own error
            raise
        self.connector.flush()
        self._step_traced(bool(flags & Flag.DECODE))
        return torch.cat([x[: mb.rows] for x, mb in zip(logits, mbs)]).cpu()

    # ---- live traces of the running deployment
    def record_trace(self, steps: int) -> None:
        """Records the next `steps` decode steps (and any prefill between them) on this rank and
        on the FFN ranks it reaches."""
        self.tracer.events.clear()
        self.tracer.enabled, self.trace_remaining = True, steps

    def _step_flags(self) -> Flag:
        return Flag.TRACE if self.trace_remaining > 0 else Flag(0)

    def _step_traced(self, decode: bool) -> None:
        """A recording of N steps is N decode steps (and the prefills between them)."""
        if self.trace_remaining > 0 and decode:
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

    def _layers(self, mbs: list[MicroBatch], attention, span: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer for every micro-batch, staggered; per micro-batch logits [b, vocab]. Free of
        host syncs and Python side effects, so it compiles into one graph (CPU) or is captured
        in one CUDA graph: the transfers are ops, each taking the previous one's result (`link`)
        so they keep this order. span: the KV blocks read as a tensor's length, when compiled
        (compilation.context_spans), else those of each micro-batch's n_ctx."""
        model, ep = self.model, self.endpoint.id
        inps = [model.attention_inputs(mb.positions, mb.slot_mapping, mb.block_tables,
                                       model.context_blocks(mb.n_ctx) if span is None else span.shape[0])
                for mb in mbs]
        hs = [None] * len(mbs)  # each micro-batch's hidden states
        sent = [None] * len(mbs)  # what each micro-batch last sent to the FFN
        link = model.embed_tokens.weight.new_empty(0)
        for layer, half in enumerate(model.attention_halves):
            for k, mb in enumerate(mbs):
                if layer > 0:
                    link = torch.ops.afd.recv_ffn_output(sent[k], link, ep, layer - 1, k)
                    hs[k] = _unpack(link, hs[k], mb)
                else:  # micro-batch k starts once micro-batch k-1 is on its way to the FFN
                    hs[k] = model.embed_tokens(mb.tokens if k == 0 else torch.ops.afd.after(mb.tokens, link))
                hs[k] = attention(half, hs[k], inps[k])
                flat = hs[k].flatten(0, 1)
                sent[k] = flat if mb.sent is None else flat[mb.sent]
                link = torch.ops.afd.send_attn_output(sent[k], link, ep, layer, k)
        logits: list[torch.Tensor] = []
        for k, mb in enumerate(mbs):
            # After the previous micro-batch's logits (which follow its receive): they are computed
            # while the FFN ranks finish this one, not after.
            link = torch.ops.afd.recv_ffn_output(sent[k], logits[-1] if logits else link, ep,
                                                 len(model.attention_halves) - 1, k)
            logits.append(model.logits(_unpack(link, hs[k], mb), mb.last_idx))
        return logits

    # ---- between steps
    def idle(self) -> bool:
        """Tells the FFN ranks this rank has nothing this round and waits for their ack: whether
        no rank had work this round (then this rank may wait for a request before the next)."""
        self.connector.send_step(StepHeader(Kind.IDLE))
        return bool(self.connector.recv_ack() & Flag.IDLE)

    def reconnect(self, connector: AFDConnector, world) -> None:
        """Continues on a new generation's links after the old ones broke. The KV cache stays;
        the requests that were mid-step when the links broke are the server's to fail."""
        self.endpoint.connector, self.world = connector, world
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
            self.endpoint.close()


def _unpack(out: torch.Tensor, h: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """A received FFN output in h's [b, L, hidden] layout (padding tokens, not sent, keep h's)."""
    if mb.sent is None:
        return out.view_as(h)
    return h.flatten(0, 1).index_copy(0, mb.sent, out).view_as(h)
