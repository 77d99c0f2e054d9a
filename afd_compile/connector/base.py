"""Connector interface and the fixed-format step header.

Protocol, per round, between an attention rank and the FFN rank it maps to:

    attention                                   FFN
    send_step(header)          ─────────────►   recv_step(peer)
      kind STEP: micro-batch token counts
      for layer, micro-batch (ping-pong order):
        send_attn_output(h)    ─────────────►     recv_attn_output(peer)
        recv_ffn_output()      ◄─────────────     send_ffn_output(peer, y)
      kind IDLE: nothing follows but an ack    ◄── send_ack(peer)
        (flag IDLE when no rank had work: the attention rank may then wait for a request
        before its next header, and the FFN rank waits patiently for it)
      kind COMPILE: the FFN compiles the decode
        round of these token counts, then acks  ◄── BUSY .. BUSY, ACK (BUSY: still compiling)

Hidden states travel as raw tensors; the header is a fixed-size int64 tensor. Nothing is
pickled. Every wait has a timeout, and a dead peer is an error, never a hang.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from afd_compile.config import MAX_MICRO_BATCHES

HEARTBEAT_S = 1.0
HEADER_LEN = 4 + MAX_MICRO_BATCHES


class Flag(enum.IntFlag):
    TRACE = 1  # FFN ranks record this round on their timeline
    DUMP = 2  # FFN ranks publish their timeline (rendezvous store key afd/trace/<step>/ffn<rank>)
    DECODE = 4  # a decode step: bucketed static shapes, which the FFN ranks run through compiled layers
    IDLE = 8  # on an ACK: no rank had work this round


class Kind(enum.IntEnum):
    STEP = 1  # hidden states of every layer follow
    IDLE = 2  # nothing to do this round; the FFN answers with an ack
    ACK = 3
    SHUTDOWN = 4  # the attention rank is leaving
    COMPILE = 5  # compile the decode round of these token counts ahead of use; BUSY until the ACK
    BUSY = 6  # the FFN rank is still compiling: an ACK follows


@dataclass
class StepHeader:
    kind: Kind
    step: int = 0
    tokens: tuple[int, ...] = ()  # token rows per micro-batch
    flags: Flag = Flag(0)

    # Packed through numpy: per-element torch indexing made a header cost ~25 us (pack + unpack),
    # paid between steps while the FFN ranks wait; through numpy it is ~5.
    def to_tensor(self) -> torch.Tensor:
        t = np.zeros(HEADER_LEN, dtype=np.int64)
        t[:4] = int(self.kind), self.step, int(self.flags), len(self.tokens)
        t[4 : 4 + len(self.tokens)] = self.tokens
        return torch.from_numpy(t)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StepHeader":
        kind, step, flags, m, *tokens = t.numpy().tolist()
        return cls(Kind(kind), step, tuple(tokens[:m]), Flag(flags))


class ConnectorError(RuntimeError):
    """The peer died, hung past the timeout, or broke the protocol."""


class AFDConnector(ABC):
    """One rank's end of its attention<->FFN links."""

    # ---- attention side (one FFN peer)
    @abstractmethod
    def send_step(self, header: StepHeader) -> None: ...

    @abstractmethod
    def send_attn_output(self, hidden: torch.Tensor, micro_batch: int) -> None:
        """Starts sending [tokens, hidden] and posts the receive of its FFN output."""

    @abstractmethod
    def recv_ffn_output(self, micro_batch: int) -> torch.Tensor:
        """Waits for the FFN output of the oldest in-flight send of this micro-batch."""

    @abstractmethod
    def recv_reply(self) -> StepHeader:
        """The FFN rank's next reply header (ACK or BUSY)."""

    def recv_ack(self) -> Flag:
        """Waits for the FFN rank's ACK, each BUSY before it restarting the wait; its flags."""
        reply = StepHeader(Kind.BUSY)
        while reply.kind is Kind.BUSY:
            reply = self.recv_reply()
        if reply.kind is not Kind.ACK:
            raise ConnectorError(f"protocol error: expected ACK from the FFN rank, got {reply.kind.name}")
        return reply.flags

    # ---- FFN side (several attention peers)
    @abstractmethod
    def recv_step(self, peer: int, patient: bool = False) -> StepHeader:
        """The peer's next header. patient: it may be long in coming (no rank had work), so the
        wait need not poll hard."""

    @abstractmethod
    def recv_attn_output(self, peer: int, tokens: int, micro_batch: int) -> torch.Tensor: ...

    @abstractmethod
    def send_ffn_output(self, peer: int, hidden: torch.Tensor, micro_batch: int) -> None: ...

    @abstractmethod
    def send_ack(self, peer: int, kind: Kind = Kind.ACK, flags: Flag = Flag(0)) -> None:
        """An ACK, or (kind BUSY) word that one follows."""

    def flush(self) -> None:
        """Waits until every started send has completed."""

    def close(self) -> None:
        """Releases the links."""


@contextmanager
def heartbeat(beat, period_s: float = HEARTBEAT_S):
    """Calls beat() at once and then every period_s, in a thread, while the body runs: a rank
    compiling a graph (tens of seconds on CPU) keeps its peers posted, where silence longer than
    the connector timeout reads as a dead rank. The body leaves the links to beat meanwhile. A
    beat's failure (the links broke) is raised after the body."""
    done, failed = threading.Event(), []

    def loop():
        try:
            while True:
                beat()
                if done.wait(period_s):
                    return
        except Exception as e:
            failed.append(e)

    thread = threading.Thread(target=loop, name="afd-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if failed:
        raise failed[0]
