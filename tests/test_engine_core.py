"""The engine core process of `afd serve` (serve/engine_core.py) and the messages it exchanges
with the API process (serve/messages.py). The server suite (test_server.py) runs against it
end to end; these are its own failure cases."""

from __future__ import annotations

import shutil
import subprocess
import sys

import msgspec
import pytest

from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.roles.rendezvous import free_port
from afd_compile.serve import messages as m
from tests.conftest import SHIPPED_MODEL


def test_messages_round_trip_without_pickle():
    add = m.AddRequest("req-1", [1, 2, 3], SamplingParams(temperature=0.5, stop=["\n"], seed=7))
    frame = m.encode(add)
    assert b"\x80" not in frame[:2]  # not a pickle (protocol 2+ starts with \x80)
    assert m.decode(frame, "core") == add
    step = m.Outputs([m.Output("req-1", [5], [{"logprob": -0.5, "top": [[5, -0.5]]}], "length", 3, 1),
                      m.Output("req-2", [], [], None, 4, 0, error="the engine failed")])
    assert m.decode(m.encode(step), "api") == step


def test_a_message_of_unknown_type_is_an_error_naming_it():
    with pytest.raises(m.ProtocolError, match="core process received a message of unknown type 'Reboot'"):
        m.decode(msgspec.msgpack.encode(["Reboot", 1]), "core")
    with pytest.raises(m.ProtocolError, match="api process received a message of unknown type 'AddRequest'"):
        m.decode(m.encode(m.AddRequest("r", [1], SamplingParams())), "api")  # one for the other side
    with pytest.raises(m.ProtocolError, match="not a message"):
        m.decode(b"\xc1", "api")


def test_an_engine_core_that_cannot_start_is_one_line_and_a_nonzero_exit(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED_MODEL, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "afd_compile", "serve", "--model", str(broken), "--enforce-eager",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("afd: error: cannot read the weights file") and "Traceback" not in proc.stderr


def test_outputs_queued_behind_a_slow_consumer_merge_into_one_delta():
    import asyncio

    from afd_compile.serve.engine_client import _merged

    async def run():
        queue = asyncio.Queue()
        for token, finish in ((2, None), (3, "length"), (4, None)):  # nothing follows a finished output
            queue.put_nowait(m.Output("r", [token], [{"logprob": -token}], finish, 5, token))
        merged = _merged(m.Output("r", [1], [{"logprob": -1}], None, 5, 1), queue)
        alone = _merged(queue.get_nowait(), queue)
        return merged, alone

    merged, alone = asyncio.run(run())
    assert merged.token_ids == [1, 2, 3] and [lp["logprob"] for lp in merged.logprobs] == [-1, -2, -3]
    assert merged.finish_reason == "length" and merged.completion_tokens == 3
    assert alone.token_ids == [4]
