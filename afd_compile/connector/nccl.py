"""GPU connector: NCCL point-to-point on CUDA tensors, written so an attention rank's decode
step (attention halves, sends and receives) can be captured in one CUDA graph.

As in vLLM's AFD connector, send and recv are registered as custom ops (`afd::send`,
`afd::recv`; recv declared as mutating its preallocated `out`), so torch.compile treats them as
opaque and CUDA-graph capture records the NCCL kernels: replaying the graph replays the
transfers into the same static buffers. Each send is paired with the receive of its FFN output
in one NCCL group (batch_isend_irecv), so neither can wait on the other. Headers (micro-batch
token counts) change every step and stay outside the graph, on the gloo connector.

Needs NCCL >= 2.9.6 for capture. Not exercised on CPU-only machines (tests skip there).
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from afd_compile.connector.gloo import GlooConnector
from afd_compile.connector.registry import Registry

_GROUPS: Registry[dist.ProcessGroup] = Registry("NCCL group")  # the ops below take its ids


@torch.library.custom_op("afd::send_recv", mutates_args=("out",))
def send_recv(x: torch.Tensor, out: torch.Tensor, peer: int, group_id: int) -> None:
    """Sends x to peer and receives out from it, as one NCCL group."""
    group = _GROUPS[group_id]
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer, group),
                                    dist.P2POp(dist.irecv, out, peer, group)])
    for work in works:
        work.wait()  # on CUDA this orders the current stream after NCCL's; it does not block the host


@send_recv.register_fake
def _(x, out, peer, group_id):
    return None


@torch.library.custom_op("afd::recv", mutates_args=("out",))
def recv(out: torch.Tensor, peer: int, group_id: int) -> None:
    dist.recv(out, peer, group=_GROUPS[group_id])


@recv.register_fake
def _(out, peer, group_id):
    return None


@torch.library.custom_op("afd::send", mutates_args=())
def send(x: torch.Tensor, peer: int, group_id: int) -> torch.Tensor:
    dist.send(x, peer, group=_GROUPS[group_id])
    return x.new_empty(0)  # a result keeps the op from being dropped as dead code


@send.register_fake
def _(x, peer, group_id):
    return x.new_empty(0)


class NcclConnector(GlooConnector):
    """Headers over gloo (CPU, outside the graph); hidden states over NCCL (GPU, graph-safe).

    The attention side passes static output buffers (one per micro-batch and layer parity) so
    a captured graph writes the FFN outputs to the same addresses on every replay.
    """

    def __init__(self, peer_ranks: dict[int, int], hidden_size: int, dtype: torch.dtype, timeout_s: float,
                 nccl_group: dist.ProcessGroup, device: torch.device):
        super().__init__(peer_ranks, hidden_size, dtype, timeout_s)
        self.group_id = _GROUPS.add(nccl_group)
        self.device = device
        # Transfers run on their own stream so the attention of micro-batch k+1 (compute
        # stream) overlaps the wait for micro-batch k's FFN output (this stream).
        self.comm_stream = torch.cuda.Stream(device)
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.cuda.Event]]] = {}

    def send_attn_output(self, hidden: torch.Tensor, micro_batch: int) -> None:
        out = torch.empty_like(hidden)
        self.comm_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.comm_stream):
            torch.ops.afd.send_recv(hidden, out, self.peers[0], self.group_id)
            done = torch.cuda.Event()
            done.record(self.comm_stream)
        hidden.record_stream(self.comm_stream)
        out.record_stream(self.comm_stream)
        self._outputs.setdefault(micro_batch, []).append((out, done))

    def recv_ffn_output(self, micro_batch: int) -> torch.Tensor:
        out, done = self._outputs[micro_batch].pop(0)
        torch.cuda.current_stream(self.device).wait_event(done)
        return out

    def recv_attn_output(self, peer: int, tokens: int, micro_batch: int) -> torch.Tensor:
        out = torch.empty(tokens, self.hidden, dtype=self.dtype, device=self.device)
        torch.ops.afd.recv(out, self.peers[peer], self.group_id)
        return out

    def send_ffn_output(self, peer: int, hidden: torch.Tensor, micro_batch: int) -> None:
        torch.ops.afd.send(hidden.contiguous(), self.peers[peer], self.group_id)

    def close(self) -> None:
        super().close()
        # The registry's reference would keep the broken world's NCCL group (its communicator and
        # sockets) alive after the rank rejoins a new generation.
        _GROUPS.remove(self.group_id)
