"""What a serving loop asks of the rank its engine runs on, besides steps.

A monolithic engine is a whole deployment on its own: this class, which does nothing. An AFD
attention rank (roles/attention_rank.py) keeps its FFN ranks in step between requests, re-forms
its links when a peer dies, records traces across ranks and times its waits for FFN output.
serve/ talks to this interface only, never to a runner or connector behind it.
"""

from __future__ import annotations

from collections.abc import Callable

from afd_compile.errors import AfdError


class Rank:
    has_peers = False  # AFD: idle rounds pace the wait for requests, and a failed step can reconnect

    def idle(self) -> bool:
        """One round with nothing to run: whether no rank of the deployment had work in it."""
        return True

    def reconnect(self) -> None:
        """Re-forms the links after a step failed; raises if they do not form in time."""
        raise AfdError("a monolithic engine has no links to re-form")

    def record_trace(self, steps: int) -> None:
        """Records the next `steps` decode steps on every rank."""
        raise AfdError("traces record the ranks of an AFD deployment; this server is monolithic")

    @property
    def trace_remaining(self) -> int:
        """Steps of the recording under way still to run."""
        return 0

    def collect_trace(self, timeout_s: float) -> dict:
        """Every rank's recorded events, as Chrome trace JSON."""
        raise AfdError("traces record the ranks of an AFD deployment; this server is monolithic")

    def observe_waits(self, observer: Callable[[int, float], None]) -> None:
        """observer(layer, seconds) for each wait for FFN output, e.g. for /metrics."""

    def close(self) -> None:
        """Leaves the deployment (an AFD rank tells its peers); the engine is not used after it."""
