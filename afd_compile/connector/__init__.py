"""The seam between attention and FFN ranks: send_attn_output -> FFN -> send_ffn_output ->
recv_ffn_output, one backend per file."""

from afd_compile.config import CONNECTORS
from afd_compile.connector.base import AFDConnector, Kind, StepHeader

__all__ = ["AFDConnector", "Kind", "StepHeader", "make_connector"]


def make_connector(backend: str, **kwargs) -> AFDConnector:
    from afd_compile.errors import AfdError

    if backend == "gloo":
        from afd_compile.connector.gloo import GlooConnector

        return GlooConnector(**kwargs)
    if backend == "nccl":
        from afd_compile.connector.nccl import NcclConnector

        return NcclConnector(**kwargs)
    if backend == "shm":
        from afd_compile.connector.shm import ShmConnector

        return ShmConnector(**kwargs)
    raise AfdError(f"unknown connector backend {backend!r}: expected one of {', '.join(CONNECTORS)}")
