"""The connector's four transfers as torch ops, so one torch.compile'd graph holds a rank's whole
decode step: every attention half (or FFN half) of every layer and micro-batch, with the
sends and receives between them. Called once per layer from Python, a compiled graph costs
~25 us of dispatch on CPU, more than a layer of the demo model computes at decode sizes.

The ops are opaque to the compiler (it calls back into the rank's connector through the
dispatcher) and ordered by data alone: each takes the previous transfer's result as `after`,
so the chain of transfers is total. Compute that feeds a send stays before it; compute that
depends on no transfer could run anywhere, so it is pinned with `after` (e.g. a micro-batch's
first layer after the previous micro-batch's first send: inductor would otherwise fuse the
micro-batches' first layers and send none until both are done, idling the FFN ranks).
Transfers return a token, never None, which keeps them from being removed as dead code.

Ops take an endpoint id (an int the graph bakes in); the endpoint holds the rank's current
connector, swapped in place when the rank rejoins on new links, and records the rank's
timeline: a transfer's own span and, before a send, the compute since the previous transfer.
Registered with torch.library.Library rather than custom_op: its Python kernel costs ~2 us a
call where custom_op's wrappers cost ~4.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from afd_compile.connector.base import AFDConnector
from afd_compile.connector.registry import Registry
from afd_compile.trace import Tracer

_ENDPOINTS: Registry[Endpoint] = Registry("AFD endpoint")


class Endpoint:
    """One rank's links as the ops see them. `compute`: the span name of the work between
    transfers ("attention" or "ffn"). On an FFN rank, `plan[k]` lists the (attention peer,
    tokens) parts of micro-batch k this round: its ops move the parts as one tensor, so a
    compiled round depends only on each micro-batch's total rows, not on how peers split them."""

    def __init__(self, connector: AFDConnector, tracer: Tracer, compute: str):
        self.id = _ENDPOINTS.add(self)
        self.connector, self.tracer, self.compute = connector, tracer, compute
        self.plan: list[list[tuple[int, int]]] = []
        self.step, self.phase = 0, "decode"
        self.wait_observer = None  # (layer, seconds) of each receive, e.g. for /metrics
        self.error: BaseException | None = None  # a transfer's exception (see raise_error)
        self._mark = 0  # time_ns when the previous transfer ended: the next compute span starts here

    def start(self, step: int, plan: list[list[tuple[int, int]]] | None = None, decode: bool = True) -> None:
        """Call before a step's (or round's) first transfer; decode: a decode step, else a prefill."""
        self.step, self.plan, self.error, self._mark = step, plan or [], None, time.time_ns()
        self.phase = "decode" if decode else "prefill"

    def raise_error(self) -> None:
        """Re-raises a transfer's exception after a compiled graph failed: the graph reports only
        that a kernel failed, and callers tell a dead peer (ConnectorError) from a bug."""
        # Not kept: its traceback holds the connector's buffers, which must close with the links.
        error, self.error = self.error, None
        if error is not None:
            raise error

    @contextmanager
    def loopback(self, hidden: int, dtype: torch.dtype, device: torch.device):
        """Transfers go nowhere while this is open (see Loopback): a rank compiles a graph of its
        step without its peers, which would otherwise wait through the compilation."""
        saved, self.connector = self.connector, Loopback(hidden, dtype, device)
        try:
            yield
        finally:
            self.connector = saved

    def close(self) -> None:
        _ENDPOINTS.remove(self.id)

    def _transfer(self, name: str, fn, layer: int, micro_batch: int, *args):
        """Runs fn(*args) as the transfer `name` ("send" or "wait") of (layer, micro_batch)."""
        start = time.time_ns()
        try:
            out = fn(*args)
        except BaseException as e:
            self.error = e
            raise
        end = time.time_ns()
        if self.tracer.enabled:
            if name == "send":  # the micro-batch's half ran since the previous transfer
                self._span(self.compute, self._mark, start, layer, micro_batch)
            self._span(name, start, end, layer, micro_batch)
        if name == "wait" and self.wait_observer is not None:
            self.wait_observer(layer, (end - start) * 1e-9)
        self._mark = end
        return out

    def _span(self, name: str, start: int, end: int, layer: int, micro_batch: int) -> None:
        self.tracer.events.append({"name": name, "cat": self.compute, "ph": "X", "pid": self.tracer.pid, "tid": 0,
                                   "ts": start / 1e3, "dur": (end - start) / 1e3,
                                   "args": {"layer": layer, "micro_batch": micro_batch, "step": self.step,
                                            "phase": self.phase}})

    # ---- FFN side: a micro-batch is its peers' parts, in plan order
    def _gather(self, micro_batch: int) -> torch.Tensor:
        peers = self.plan[micro_batch]
        if len(peers) == 1:
            return self.connector.recv_attn_output(*peers[0], micro_batch)
        return torch.cat([self.connector.recv_attn_output(p, n, micro_batch) for p, n in peers])

    def _scatter(self, y: torch.Tensor, micro_batch: int) -> None:
        peers = self.plan[micro_batch]
        if len(peers) == 1:
            return self.connector.send_ffn_output(peers[0][0], y, micro_batch)
        for (p, _), out in zip(peers, y.split([n for _, n in peers])):
            self.connector.send_ffn_output(p, out, micro_batch)


class Loopback(AFDConnector):
    """A connector without peers: the FFN output of a send is the sent tensor, and an FFN rank
    receives zeros. Only transfers: no step headers."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self._sent: dict[int, list[torch.Tensor]] = {}

    def send_step(self, header):
        raise NotImplementedError

    def recv_reply(self):
        raise NotImplementedError

    def recv_step(self, peer, patient=False):
        raise NotImplementedError

    def send_ack(self, peer, kind=None, flags=None):
        raise NotImplementedError

    def send_attn_output(self, hidden, micro_batch):
        self._sent.setdefault(micro_batch, []).append(hidden.clone())

    def recv_ffn_output(self, micro_batch):
        return self._sent[micro_batch].pop(0)

    def recv_attn_output(self, peer, tokens, micro_batch):
        return torch.zeros(tokens, self.hidden, dtype=self.dtype, device=self.device)

    def send_ffn_output(self, peer, hidden, micro_batch):
        pass


_lib = torch.library.Library("afd", "FRAGMENT")
_lib.define("send_attn_output(Tensor x, Tensor after, int endpoint, int layer, int micro_batch) -> Tensor")
_lib.define("recv_ffn_output(Tensor like, Tensor after, int endpoint, int layer, int micro_batch) -> Tensor")
_lib.define("recv_attn_output(Tensor after, int endpoint, int tokens, int hidden, int layer, int micro_batch) -> Tensor")
_lib.define("send_ffn_output(Tensor y, Tensor after, int endpoint, int layer, int micro_batch) -> Tensor")
_lib.define("after(Tensor x, Tensor after) -> Tensor")


def _token(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


# ---- attention side
def send_attn_output(x: torch.Tensor, after: torch.Tensor, endpoint: int, layer: int, micro_batch: int) -> torch.Tensor:
    ep = _ENDPOINTS[endpoint]
    ep._transfer("send", ep.connector.send_attn_output, layer, micro_batch, x, micro_batch)
    return _token(x)


def recv_ffn_output(like: torch.Tensor, after: torch.Tensor, endpoint: int, layer: int,
                    micro_batch: int) -> torch.Tensor:
    """The FFN output of the oldest send of micro_batch, shaped like what was sent."""
    ep = _ENDPOINTS[endpoint]
    return ep._transfer("wait", ep.connector.recv_ffn_output, layer, micro_batch, micro_batch)


# ---- FFN side
def recv_attn_output(after: torch.Tensor, endpoint: int, tokens: int, hidden: int, layer: int,
                     micro_batch: int) -> torch.Tensor:
    """Micro-batch micro_batch of every peer in the round's plan, concatenated: [tokens, hidden]."""
    ep = _ENDPOINTS[endpoint]
    return ep._transfer("wait", ep._gather, layer, micro_batch, micro_batch)


def send_ffn_output(y: torch.Tensor, after: torch.Tensor, endpoint: int, layer: int, micro_batch: int) -> torch.Tensor:
    ep = _ENDPOINTS[endpoint]
    ep._transfer("send", ep._scatter, layer, micro_batch, y, micro_batch)
    return _token(y)


def after(x: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """A copy of x that the compiler cannot make before `after` exists: orders compute that
    depends on no transfer (the copy is of a micro-batch's token ids: bytes)."""
    return x.clone()


# One kernel for every device: the connector moves the tensors it is given (NCCL on CUDA).
for _name, _fn in [("after", after), ("send_attn_output", send_attn_output), ("recv_ffn_output", recv_ffn_output),
                   ("recv_attn_output", recv_attn_output), ("send_ffn_output", send_ffn_output)]:
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


@torch.library.register_fake("afd::send_attn_output", lib=_lib)
def _(x, after, endpoint, layer, micro_batch):
    return _token(x)


@torch.library.register_fake("afd::recv_ffn_output", lib=_lib)
def _(like, after, endpoint, layer, micro_batch):
    return torch.empty_like(like)


@torch.library.register_fake("afd::recv_attn_output", lib=_lib)
def _(after, endpoint, tokens, hidden, layer, micro_batch):
    return after.new_empty(tokens, hidden)


@torch.library.register_fake("afd::after", lib=_lib)
def _(x, after):
    return torch.empty_like(x)


@torch.library.register_fake("afd::send_ffn_output", lib=_lib)
def _(y, after, endpoint, layer, micro_batch):
    return _token(y)
