"""CUDA graphs for the attention rank's decode step: attention halves, NCCL sends and
receives (connector/nccl.py) and lm_head of every micro-batch, captured once per decode shape
(micro-batch count x bucket) and replayed with new inputs copied into static buffers.

Only the step header (token counts) is sent outside the graph, before each replay, so the FFN
ranks post receives for every transfer the replay performs. Nothing here runs on CPU builds.
"""

from __future__ import annotations

import dataclasses

import torch

from afd_compile.connector.base import Flag, Kind, StepHeader


def _static_copy(mb):
    inp = dataclasses.replace(mb.inp, **{f: getattr(mb.inp, f).clone() for f in
                                         ("positions", "write_slots", "read_slots", "cos", "sin")})
    return dataclasses.replace(mb, tokens=mb.tokens.clone(), inp=inp, last_idx=mb.last_idx.clone())


def _fill(static, mb) -> None:
    static.tokens.copy_(mb.tokens)
    static.last_idx.copy_(mb.last_idx)
    for f in ("positions", "write_slots", "read_slots", "cos", "sin"):
        getattr(static.inp, f).copy_(getattr(mb.inp, f))


class DecodeGraphs:
    def __init__(self, runner, attention):
        self.runner, self.attention = runner, attention
        self.graphs: dict[tuple[int, int], tuple[list, list[torch.Tensor], torch.cuda.CUDAGraph]] = {}

    def __call__(self, mbs) -> torch.Tensor:
        key = (len(mbs), mbs[0].tokens.shape[0])
        if key not in self.graphs:
            self.graphs[key] = self._capture(mbs)
        static, logits, graph = self.graphs[key]
        for s, mb in zip(static, mbs):
            _fill(s, mb)
        step = next(self.runner.steps)
        self.runner.connector.send_step(StepHeader(Kind.STEP, step, tuple(mb.num_sent for mb in mbs),
                                                   self.runner._step_flags() | Flag.DECODE))
        graph.replay()  # host-side spans are not recorded inside a replay; the FFN side's are
        self.runner._step_traced()
        return torch.cat([x[: mb.rows] for x, mb in zip(logits, mbs)]).cpu()

    def _capture(self, mbs):
        static = [_static_copy(mb) for mb in mbs]
        # One real step first (the FFN ranks answer it): NCCL communicators, cuBLAS workspaces
        # and compiled kernels must exist before capture. It computes exactly this batch's
        # step, so its KV cache writes are the ones the replay makes again.
        self.runner._pipeline(static, self.attention, Flag.DECODE)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.runner._layers(static, self.attention, step=-1)
        return static, logits, graph
