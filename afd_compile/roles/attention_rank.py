"""An AFD attention rank as serve/ sees it (engine.rank.Rank): idle rounds that keep the FFN ranks
in step, a new generation of the world when a peer died, traces over every rank, connector
waits for /metrics, and a goodbye to the FFN ranks on close. worker.attention_engine builds it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from afd_compile.config import AFDConfig
from afd_compile.connector.base import AFDConnector
from afd_compile.engine.rank import Rank
from afd_compile.roles import rendezvous
from afd_compile.roles.attention import AFDModelRunner
from afd_compile.trace import Tracer

log = logging.getLogger("afd")


class AttentionRank(Rank):
    has_peers = True

    def __init__(self, runner: AFDModelRunner, afd: AFDConfig, tracer: Tracer,
                 links: Callable[[rendezvous.World], AFDConnector]):
        """links(world): this rank's connector in a newly formed world."""
        self.runner, self.afd, self.tracer, self.links = runner, afd, tracer, links

    def idle(self) -> bool:
        return self.runner.idle()

    def reconnect(self) -> None:
        """Joins the world's next generation and continues on new links; AfdError if it does not
        form within the connector timeout."""
        try:
            self.runner.connector.close()
        except Exception as e:  # a half-broken link must not keep this rank from rejoining
            log.warning("closing the broken links: %s", e)
        afd = self.afd
        world = rendezvous.join(afd.topology, "attention", afd.rank, afd.timeout_s, nccl=afd.connector == "nccl",
                                previous=self.runner.world)
        self.runner.reconnect(self.links(world), world)

    def record_trace(self, steps: int) -> None:
        self.runner.record_trace(steps)

    @property
    def trace_remaining(self) -> int:
        return self.runner.trace_remaining

    def collect_trace(self, timeout_s: float) -> dict:
        return self.runner.collect_trace(timeout_s)

    def observe_waits(self, observer: Callable[[int, float], None]) -> None:
        self.runner.wait_observer = observer

    def close(self) -> None:
        """Tells the FFN ranks, saves the trace, leaves the world."""
        try:
            self.runner.shutdown()
        finally:
            if self.afd.trace:
                self.tracer.save(self.afd.trace)
            rendezvous.leave()
