"""The NCCL connector's group registry, checked without NCCL or a GPU: its custom ops find
their process group by an int key, and a rank that rejoins a new generation of the AFD world
must never reach the broken world's group through it."""

from __future__ import annotations

import pytest
import torch

from afd_compile.connector import nccl
from afd_compile.connector.base import ConnectorError


@pytest.fixture
def make_connector(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)  # no CUDA here; no transfer runs

    def make(group) -> nccl.NcclConnector:
        return nccl.NcclConnector({0: 1}, hidden_size=4, dtype=torch.float32, timeout_s=1.0, nccl_group=group,
                                  device=torch.device("cpu"))

    return make


def test_close_releases_the_group_and_a_reconnect_gets_a_new_key(make_connector):
    """Oracle: the registry holds each open connector's group under its own key, and only while
    that connector is open; the next generation's key differs from every earlier one."""
    old_group, new_group = object(), object()  # stand-ins for two generations' NCCL groups
    old = make_connector(old_group)
    assert nccl._GROUPS[old.group_id] is old_group
    old.close()
    assert old.group_id not in nccl._GROUPS
    old.close()  # a rank closes broken links again on its way out
    new = make_connector(new_group)
    assert new.group_id != old.group_id and nccl._GROUPS[new.group_id] is new_group
    new.close()
    assert new.group_id not in nccl._GROUPS


def test_a_closed_connectors_key_fails_clearly(make_connector):
    """Oracle: a transfer through a closed connector's key raises ConnectorError (the error a broken
    link raises, so the rank rejoins), before anything is sent."""
    connector = make_connector(object())
    connector.close()
    with pytest.raises(ConnectorError, match="was released"):
        torch.ops.afd.recv(torch.empty(2, 4), 1, connector.group_id)
