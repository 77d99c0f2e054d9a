"""torch.distributed point-to-point over gloo: works across hosts, CPU tensors.

Sends are asynchronous (isend) so an attention rank computes the next micro-batch while its
previous one is in flight; the matching receive is posted at the same time. Every wait has
the connector timeout; gloo closes the link on a timeout and fails at once when the peer's
process is gone, so both become ConnectorError.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from collections import deque

import torch
import torch.distributed as dist

from afd_compile.connector.base import HEADER_LEN, AFDConnector, ConnectorError, Flag, Kind, StepHeader

log = logging.getLogger("afd.connector")
_HEADER_TAG = 1 << 20  # headers and acks never match a hidden-state receive


class GlooConnector(AFDConnector):
    def __init__(self, peer_ranks: dict[int, int], hidden_size: int, dtype: torch.dtype, timeout_s: float,
                 group: dist.ProcessGroup | None = None):
        """peer_ranks: local peer index -> global rank (an attention rank has one peer: its FFN rank)."""
        self.peers, self.hidden, self.dtype = peer_ranks, hidden_size, dtype
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.group = group
        self._sends: list[dist.Work] = []
        self._recvs: dict[int, deque] = {}

    def _wait(self, work: dist.Work, what: str) -> None:
        start = time.monotonic()
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            waited, detail = time.monotonic() - start, str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning("%s failed after %.1f s: %s", what, waited, detail)  # gloo's own words, for the log only
            if waited < self.timeout.total_seconds() * 0.9:
                raise ConnectorError(f"{what} failed: the peer closed the connection ({_reason(detail)})") from None
            raise ConnectorError(f"{what} failed: nothing from the peer for {waited:.0f} s") from None

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        # A copy: gloo reads the tensor after isend returns, while the caller may reuse its memory
        # at once (a compiled step reuses a sent buffer for the next kernel's output).
        self._sends.append(dist.isend(tensor.clone(memory_format=torch.contiguous_format), self.peers[peer],
                                      group=self.group, tag=tag))
        # Completed sends are dropped as we go so the list stays short in long runs.
        while len(self._sends) > 64 and self._sends[0].is_completed():
            self._sends.pop(0)

    def _recv(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> torch.Tensor:
        self._wait(dist.irecv(tensor, self.peers[peer], group=self.group, tag=tag), what)
        return tensor

    # ---- attention side
    def send_step(self, header: StepHeader) -> None:
        self._isend(header.to_tensor(), 0, _HEADER_TAG)

    def send_attn_output(self, hidden: torch.Tensor, micro_batch: int) -> None:
        self._isend(hidden, 0, micro_batch)
        out = torch.empty_like(hidden)
        work = dist.irecv(out, self.peers[0], group=self.group, tag=micro_batch)
        self._recvs.setdefault(micro_batch, deque()).append((work, out))

    def recv_ffn_output(self, micro_batch: int) -> torch.Tensor:
        work, out = self._recvs[micro_batch].popleft()
        self._wait(work, f"receiving the FFN output of micro-batch {micro_batch}")
        return out

    def recv_reply(self) -> StepHeader:
        return StepHeader.from_tensor(self._recv(torch.empty(HEADER_LEN, dtype=torch.int64), 0, _HEADER_TAG,
                                                 "waiting for the FFN rank's ack"))

    # ---- FFN side
    def recv_step(self, peer: int, patient: bool = False) -> StepHeader:  # gloo's wait blocks: always patient
        t = self._recv(torch.empty(HEADER_LEN, dtype=torch.int64), peer, _HEADER_TAG,
                       f"waiting for a step header from attention peer {peer}")
        return StepHeader.from_tensor(t)

    def recv_attn_output(self, peer: int, tokens: int, micro_batch: int) -> torch.Tensor:
        out = torch.empty(tokens, self.hidden, dtype=self.dtype)
        return self._recv(out, peer, micro_batch, f"receiving micro-batch {micro_batch} from attention peer {peer}")

    def send_ffn_output(self, peer: int, hidden: torch.Tensor, micro_batch: int) -> None:
        self._isend(hidden, peer, micro_batch)

    def send_ack(self, peer: int, kind: Kind = Kind.ACK, flags: Flag = Flag(0)) -> None:
        self._isend(StepHeader(kind, flags=flags).to_tensor(), peer, _HEADER_TAG)

    def flush(self) -> None:
        for work in self._sends:
            self._wait(work, "sending to a peer")
        self._sends.clear()

    def close(self) -> None:
        # Pending work keeps the process group's sockets open: drop it so that, once this rank
        # leaves the group, its peers see the link close at once rather than at their timeout.
        self._sends.clear()
        self._recvs.clear()


def _reason(gloo_error: str) -> str:
    """gloo's error without its source path and the peer's address (they say nothing to an API
    client): `[../gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4021: Connection reset
    by peer` -> `Read error: Connection reset by peer`."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", gloo_error)
    text = re.sub(r"\s*\[[0-9a-fA-F.:]+\]:\d+", "", text)
    return text.strip() or "no reason given"
