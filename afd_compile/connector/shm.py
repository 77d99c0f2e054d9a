"""Same-host connector: a single-producer single-consumer byte ring in shared memory per
direction of each attention<->FFN link.

Why not gloo on one host: every gloo message crosses the loopback TCP stack twice and a
background thread; here a message is one memcpy into /dev/shm and one out, and the waiting
side polls a counter (spinning briefly, then yielding the core, then sleeping). The ring streams a message of any
size through its fixed capacity, so prefill batches need no special case.

Ordering relies on x86-64's total store order: the writer stores the payload, then the
aligned 8-byte head counter; the reader loads the head, then the payload. Liveness: a waiting
side checks that the peer's pid still exists, so a dead peer is an error at once; a silent one
after the timeout.
"""

from __future__ import annotations

import mmap
import os
import time
from multiprocessing import shared_memory

import numpy as np
import torch

from afd_compile.connector.base import HEADER_LEN, AFDConnector, ConnectorError, Flag, Kind, StepHeader

MIN_RING_BYTES = 4 << 20
_CTRL = 64  # head, tail, writer pid, reader pid, closed: int64 each, one cache line
_HEAD, _TAIL, _WRITER, _READER, _CLOSED = range(5)
_SPIN_S = 50e-6  # busy-poll this long: in a decode pipeline the reply is usually this close
_YIELD_S = 1e-3  # then poll yielding the core this long; then sleep a tenth of the wait so far
_MAX_SLEEP_S = 2e-3


class Ring:
    """One direction of a link: bytes written by one process, read by another."""

    def __init__(self, name: str, create: bool, size: int):
        self.creator = create
        if create:
            # Created through multiprocessing's SharedMemory so its resource tracker unlinks the
            # segment even if this process is killed.
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=_CTRL + size)
            self.buf = self.shm.buf
        else:
            # Attached with a plain mmap: SharedMemory would register the segment with this
            # process's tracker too, which would then "clean up" the peer's segment at exit.
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            try:
                self.buf = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        self.size = len(self.buf) - _CTRL
        # numpy views: a scalar load or store is ~100 ns, where a torch index costs microseconds.
        self.ctrl = np.frombuffer(self.buf, dtype=np.int64, count=_CTRL // 8)
        self.data = np.frombuffer(self.buf, dtype=np.uint8, count=self.size, offset=_CTRL)
        if create:
            self.ctrl[:] = 0

    def _wait(self, ready, peer_slot: int, timeout_s: float, what: str, patient: bool = False) -> None:
        """Spins, then yields, then sleeps. patient: the wait is expected to be long (an idle
        rank's ack), so sleep from the start."""
        start = time.monotonic()
        next_check = start + 0.05
        spin_s, yield_s = (0.0, 0.0) if patient else (_SPIN_S, _YIELD_S)
        while not ready():
            now = time.monotonic()
            waited = now - start
            if waited >= spin_s:
                # sched_yield hands the core to a runnable process and returns at once if there
                # is none; time.sleep, even sleep(0), costs ~60-80 us of timer slack on Linux.
                if waited < yield_s:
                    os.sched_yield()
                else:  # an idle peer: little CPU, at most ~10% added latency
                    time.sleep(min(waited / 10 + 50e-6, _MAX_SLEEP_S))
            if now >= next_check:
                next_check = now + 0.05
                pid = int(self.ctrl[peer_slot])
                # ready() again: a peer may have written its last message (a SHUTDOWN header, say)
                # and left while this side slept; what it wrote is still to be read.
                if (self.ctrl[_CLOSED] or (pid and not _alive(pid))) and not ready():
                    raise ConnectorError(f"{what}: the peer process is gone")
                if waited > timeout_s:
                    raise ConnectorError(f"{what}: no data from the peer for {timeout_s:.0f} s")

    def attach(self, slot: int) -> None:
        """Registers this process as the ring's writer (_WRITER) or reader (_READER), for the
        peer's liveness checks."""
        self.ctrl[slot] = os.getpid()

    def write(self, payload: torch.Tensor, timeout_s: float, what: str) -> None:
        ctrl, size = self.ctrl, self.size
        src = _as_bytes(payload.detach().contiguous())
        head, done, n = int(ctrl[_HEAD]), 0, src.size
        while done < n:
            if head - int(ctrl[_TAIL]) >= size:
                self._wait(lambda h=head: h - int(ctrl[_TAIL]) < size, _READER, timeout_s, what)
            pos = head % size
            chunk = min(n - done, size - (head - int(ctrl[_TAIL])), size - pos)
            self.data[pos : pos + chunk] = src[done : done + chunk]
            head, done = head + chunk, done + chunk
            ctrl[_HEAD] = head  # publish after the bytes (x86-64 store order)

    def read_into(self, out: torch.Tensor, timeout_s: float, what: str, patient: bool = False) -> torch.Tensor:
        ctrl, size = self.ctrl, self.size
        dst = _as_bytes(out)
        tail, done, n = int(ctrl[_TAIL]), 0, dst.size
        while done < n:
            if int(ctrl[_HEAD]) <= tail:
                self._wait(lambda t=tail: int(ctrl[_HEAD]) > t, _WRITER, timeout_s, what, patient)
            pos = tail % size
            chunk = min(n - done, int(ctrl[_HEAD]) - tail, size - pos)
            dst[done : done + chunk] = self.data[pos : pos + chunk]
            tail, done = tail + chunk, done + chunk
            ctrl[_TAIL] = tail
        return out

    def close(self) -> None:
        self.ctrl[_CLOSED] = 1
        del self.ctrl, self.data
        if self.creator:
            del self.buf
            self.shm.close()
            self.shm.unlink()
        else:
            self.buf.close()


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes as a numpy view, no copy. numpy's reshape and view cost a
    fraction of torch's, and a message pays this on both sides."""
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16
        return t.view(torch.uint8).numpy().reshape(-1)
    return t.numpy().reshape(-1).view(np.uint8)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmConnector(AFDConnector):
    """links: peer index -> (segment name prefix, whether this side creates the segments)."""

    def __init__(self, links: dict[int, tuple[str, bool]], hidden_size: int, dtype: torch.dtype, timeout_s: float,
                 is_attention: bool, max_message_tokens: int):
        self.hidden, self.dtype, self.timeout = hidden_size, dtype, timeout_s
        # Two largest messages fit at once, so neither side can block the other with a full ring.
        size = max(MIN_RING_BYTES, 2 * max_message_tokens * hidden_size * dtype.itemsize + 4096)
        self.out: dict[int, Ring] = {}
        self.inp: dict[int, Ring] = {}
        for peer, (prefix, create) in links.items():
            a2f, f2a = Ring(f"{prefix}-a2f", create, size), Ring(f"{prefix}-f2a", create, size)
            self.out[peer], self.inp[peer] = (a2f, f2a) if is_attention else (f2a, a2f)
            self.out[peer].attach(_WRITER)
            self.inp[peer].attach(_READER)
        self._pending: dict[int, list[torch.Tensor]] = {}

    # Messages on one ring are read in the order written, so micro-batch tags need no matching.
    def send_step(self, header: StepHeader) -> None:
        self.out[0].write(header.to_tensor(), self.timeout, "sending a step header")

    def send_attn_output(self, hidden: torch.Tensor, micro_batch: int) -> None:
        self.out[0].write(hidden, self.timeout, f"sending micro-batch {micro_batch}")
        self._pending.setdefault(micro_batch, []).append(torch.empty_like(hidden))

    def recv_ffn_output(self, micro_batch: int) -> torch.Tensor:
        out = self._pending[micro_batch].pop(0)
        return self.inp[0].read_into(out, self.timeout, f"receiving the FFN output of micro-batch {micro_batch}")

    def recv_reply(self) -> StepHeader:
        # An idle rank waits here while the FFN ranks serve its busy peers: it must not spin.
        t = self.inp[0].read_into(torch.empty(HEADER_LEN, dtype=torch.int64), self.timeout, "waiting for an ack",
                                  patient=True)
        return StepHeader.from_tensor(t)

    def recv_step(self, peer: int, patient: bool = False) -> StepHeader:
        t = self.inp[peer].read_into(torch.empty(HEADER_LEN, dtype=torch.int64), self.timeout,
                                     f"waiting for a step header from attention peer {peer}", patient=patient)
        return StepHeader.from_tensor(t)

    def recv_attn_output(self, peer: int, tokens: int, micro_batch: int) -> torch.Tensor:
        return self.inp[peer].read_into(torch.empty(tokens, self.hidden, dtype=self.dtype), self.timeout,
                                        f"receiving micro-batch {micro_batch} from attention peer {peer}")

    def send_ffn_output(self, peer: int, hidden: torch.Tensor, micro_batch: int) -> None:
        self.out[peer].write(hidden, self.timeout, f"sending micro-batch {micro_batch} to attention peer {peer}")

    def send_ack(self, peer: int, kind: Kind = Kind.ACK, flags: Flag = Flag(0)) -> None:
        self.out[peer].write(StepHeader(kind, flags=flags).to_tensor(), self.timeout, "sending an ack")

    def close(self) -> None:
        for ring in [*self.out.values(), *self.inp.values()]:
            ring.close()
