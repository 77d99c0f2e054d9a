"""CUDA graphs for the attention rank's decode step: attention halves, NCCL sends and
receives (connector/nccl.py, called through connector/ops.py) and lm_head of every
micro-batch, captured once per decode shape (micro-batch count x bucket x context bucket)
and replayed.

The runner's persistent decode inputs (one set per shape, rewritten in place each step) are
the graph's static inputs. Only the step header (token counts) is sent outside the graph,
before each replay, so the FFN ranks post receives for every transfer the replay performs.
Nothing here runs on CPU builds.
"""

from __future__ import annotations

import torch

from afd_compile.connector.base import Flag, Kind, StepHeader


class DecodeGraphs:
    def __init__(self, runner, attention):
        self.runner, self.attention = runner, attention
        self.graphs: dict[tuple[int, int, int], tuple[list[torch.Tensor], torch.cuda.CUDAGraph]] = {}

    def __call__(self, mbs) -> torch.Tensor:
        key = (len(mbs), mbs[0].tokens.shape[0], mbs[0].n_ctx)
        if key not in self.graphs:
            # One real step first (the FFN ranks answer it): NCCL communicators, cuBLAS
            # workspaces and compiled kernels must exist before capture. Capture runs the step
            # again without sending a header: the FFN ranks see only this step's transfers
            # once, from the eager run; the capture's own NCCL calls are recorded, not run.
            logits = self.runner._pipeline(mbs, self.runner._layers, self.attention, Flag.DECODE)
            torch.cuda.synchronize()
            self.graphs[key] = self._capture(mbs)
            return logits
        static_logits, graph = self.graphs[key]
        step = next(self.runner.steps)
        self.runner.connector.send_step(StepHeader(Kind.STEP, step, tuple(mb.num_sent for mb in mbs),
                                                   self.runner._step_flags() | Flag.DECODE))
        graph.replay()  # host-side spans are not recorded inside a replay; the FFN side's are
        self.runner._step_traced(decode=True)
        return torch.cat([x[: mb.rows] for x, mb in zip(static_logits, mbs)]).cpu()

    def _capture(self, mbs):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.runner._layers(mbs, self.attention)
        return logits, graph
