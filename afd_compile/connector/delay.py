"""An injected per-message link delay (`--connector-delay-us`), to show what ping-pong
micro-batches hide: every hidden-state message becomes visible to its receiver only `delay`
after it was sent, as over a slower link, while the sender goes on at once.

The send time travels in one extra row appended to the message (int64 nanoseconds of
CLOCK_MONOTONIC, which every process of one host shares), so this works over any connector
but only between ranks on one host. Step headers and acks are not delayed: one per step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from afd_compile.connector.base import AFDConnector, Flag, Kind, StepHeader

_SPIN_NS = 150_000  # the end of a delay is spun, not slept: a sleep wakes ~100 us late


# Stamped and unstamped as bytes through numpy: the torch ops it takes otherwise (new_zeros, a
# setitem, cat; a slice and an item on arrival) cost ~15 us more per message inside a compiled
# step (measured: sends 8 -> 22 us), which the sender and receiver would pay on their critical
# paths and the overlap benchmark would book as link delay not hidden.
def _stamped(hidden: torch.Tensor) -> torch.Tensor:
    src = hidden.contiguous().view(torch.uint8).numpy()
    out = np.empty((src.shape[0] + 1, src.shape[1]), np.uint8)
    out[:-1] = src
    out[-1, :8].view(np.int64)[0] = time.monotonic_ns()
    return torch.from_numpy(out).view(hidden.dtype)


def _sent_at(stamped: torch.Tensor) -> int:
    return int(stamped.view(torch.uint8).numpy()[-1, :8].view(np.int64)[0])


class DelayedConnector(AFDConnector):
    def __init__(self, inner: AFDConnector, delay_us: float, hidden_size: int, dtype: torch.dtype):
        if hidden_size * dtype.itemsize % 8:
            raise ValueError("the delay stamp needs rows of a multiple of 8 bytes")
        self.inner, self.delay_ns = inner, int(delay_us * 1e3)

    def _arrive(self, stamped: torch.Tensor) -> torch.Tensor:
        """Waits until the message's send time plus the delay, then returns it without the stamp
        row. Sleeps through all but the last _SPIN_NS of the wait, as a receiver blocked on a slow
        link would: a spinning core slows the other vCPU's compute by ~15% on the 2-core VM."""
        due = _sent_at(stamped) + self.delay_ns
        ahead = due - time.monotonic_ns() - _SPIN_NS
        if ahead > 0:
            time.sleep(ahead * 1e-9)
        while time.monotonic_ns() < due:
            pass
        return stamped[:-1]

    # ---- attention side
    def send_step(self, header: StepHeader) -> None:
        self.inner.send_step(header)

    def send_attn_output(self, hidden: torch.Tensor, micro_batch: int) -> None:
        self.inner.send_attn_output(_stamped(hidden), micro_batch)

    def recv_ffn_output(self, micro_batch: int) -> torch.Tensor:
        return self._arrive(self.inner.recv_ffn_output(micro_batch))

    def recv_reply(self) -> StepHeader:
        return self.inner.recv_reply()

    # ---- FFN side
    def recv_step(self, peer: int, patient: bool = False) -> StepHeader:
        return self.inner.recv_step(peer, patient)

    def recv_attn_output(self, peer: int, tokens: int, micro_batch: int) -> torch.Tensor:
        return self._arrive(self.inner.recv_attn_output(peer, tokens + 1, micro_batch))

    def send_ffn_output(self, peer: int, hidden: torch.Tensor, micro_batch: int) -> None:
        self.inner.send_ffn_output(peer, _stamped(hidden), micro_batch)

    def send_ack(self, peer: int, kind: Kind = Kind.ACK, flags: Flag = Flag(0)) -> None:
        self.inner.send_ack(peer, kind, flags)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
