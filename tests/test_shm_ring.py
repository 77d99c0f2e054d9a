"""The shared-memory connector's byte ring (connector/shm.py): messages of any size arrive intact
and in order, whether they fit before the ring's end, wrap around it, or are larger than the
ring and stream through it while the reader drains it."""

from __future__ import annotations

import os
import threading

import torch

from afd_compile.connector.shm import _READER, _WRITER, Ring


def test_messages_of_any_size_arrive_intact_and_in_order():
    name = f"afd-test-ring-{os.getpid()}"
    writer, reader = Ring(name, create=True, size=4096), Ring(name, create=False, size=4096)
    writer.attach(_WRITER)
    reader.attach(_READER)
    torch.manual_seed(0)
    # floats: 400 B (fits), 12 KB (3x the ring), odd sizes that leave the head mid-ring, so later
    # messages wrap around its end
    messages = [torch.randn(n) for n in (100, 3000, 1, 1023, 777, 1024, 5, 2500, 999)]
    received: list[torch.Tensor] = []

    def read_all():
        for m in messages:
            received.append(reader.read_into(torch.empty_like(m), 10, "test read"))

    t = threading.Thread(target=read_all)
    t.start()
    try:
        for m in messages:
            writer.write(m, 10, "test write")
    finally:
        t.join(timeout=30)
        reader.close()
        writer.close()
    assert len(received) == len(messages)
    for got, sent in zip(received, messages):
        assert torch.equal(got, sent)


def test_the_last_message_of_a_peer_that_left_is_still_read(monkeypatch):
    """A peer writes its last message (a SHUTDOWN header) and closes the ring while the reader
    sleeps; the reader's liveness check then finds the ring closed but must read the message, not
    report the peer gone. A fake clock puts the write exactly before a liveness check."""
    from afd_compile.connector import shm

    class Clock:
        t = 0.0

        def monotonic(self):
            self.t += 0.01
            return self.t

        def sleep(self, seconds):
            pass

    clock = Clock()
    monkeypatch.setattr(shm, "time", clock)
    ring = Ring(f"afd-test-ring-closed-{os.getpid()}", create=True, size=4096)
    arrived = []

    def ready():  # the message lands, and the ring closes, just before the check at t = 0.06
        if not arrived and clock.t >= 0.05:
            ring.ctrl[shm._CLOSED] = 1
            arrived.append(True)
            return False
        return bool(arrived)

    try:
        ring._wait(ready, _WRITER, 10.0, "test read")  # returns: nothing raised
    finally:
        ring.close()
    assert arrived
