"""A rank of a running `afd launch --afd-size 1A1F` killed with SIGKILL: the launcher restarts
it, the survivors re-form the AFD world with it (a new rendezvous generation), and serving
resumes with the same greedy answers.

The deployment has one KV cache slot (--max-num-seqs 1), so a second request provably waits in
the queue while the first decodes: the first is in flight when the FFN rank dies (it must fail
with 503 within 10 s), the second is queued (it must be retried and complete).
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import start_launch
from tests.test_server import ODD, ODD_ANSWER, assert_error, chat, wait_metric

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def launch(shipped_model, tmp_path_factory):
    d = start_launch(shipped_model, tmp_path_factory.mktemp("restart-logs"), extra=["--max-num-seqs", "1"])
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def rank_pid(launch, command: str) -> int:
    """The pid of the launcher's child running `afd <command>` (ffn: the FFN rank; serve: attention)."""
    pids = [pid for task in Path(f"/proc/{launch.server.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()]
    found = [int(pid) for pid in pids if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3:4] == [
        command.encode()]]
    assert len(found) == 1, (command, pids)
    return found[0]


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def stream_until_end(d, **params) -> tuple[list[dict], float]:
    """Streams a chat completion; returns its events and when the stream ended."""
    body = {"model": d.model, "messages": [{"role": "user", "content": ODD}], "stream": True, **params}
    events = []
    with httpx.stream("POST", f"{d.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events, time.monotonic()


def wait_health(d, status: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(f"{d.url}/health", timeout=5)
            if r.status_code == status:
                return r.json()
        except httpx.HTTPError:
            pass  # the attention rank is down or still starting
        assert time.monotonic() < deadline, f"/health did not answer {status} within {timeout_s} s"
        time.sleep(0.1)


def test_ffn_rank_killed_is_restarted_and_serving_resumes(launch):
    """Oracle: the greedy answer before the kill; the in-flight request ends with a 503 error event
    within 10 s, /health says degraded, the queued request and a new one get the same answer."""
    assert answer(chat(launch, ODD, temperature=0)) == ODD_ANSWER
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(stream_until_end, launch, temperature=0, max_tokens=480, ignore_eos=True)
        wait_metric(launch, "afd:num_requests_running", 1)
        queued = pool.submit(chat, launch, ODD, temperature=0, timeout=150)
        wait_metric(launch, "afd:num_requests_waiting", 1)
        os.kill(rank_pid(launch, "ffn"), signal.SIGKILL)
        killed = time.monotonic()

        events, ended = in_flight.result(timeout=30)
        assert ended - killed < 10
        assert events[-1]["error"]["type"] == "service_unavailable", events[-1]
        assert events[-1]["error"]["code"] == 503
        health = wait_health(launch, 503, 10)
        assert health["status"] == "degraded", health
        assert_error(chat(launch, ODD, temperature=0, timeout=10), 503)  # new requests: refused while down

        assert wait_health(launch, 200, 120)["status"] == "ok"
        assert answer(queued.result(timeout=60)) == ODD_ANSWER  # retried after the reconnect, not lost
    assert answer(chat(launch, ODD, temperature=0)) == ODD_ANSWER
    assert "ffn 0 was killed by SIGKILL; restart 1 of 3" in launch.server.stderr()


def test_attention_rank_killed_is_restarted_and_ffn_waits(launch):
    """Oracle: the FFN process survives (same pid) and serves the restarted attention rank, which
    gives the same greedy answer."""
    wait_health(launch, 200, 120)
    ffn, attention = rank_pid(launch, "ffn"), rank_pid(launch, "serve")
    os.kill(attention, signal.SIGKILL)
    wait_health(launch, 200, 120)
    assert rank_pid(launch, "serve") != attention
    assert rank_pid(launch, "ffn") == ffn  # it waited in the rendezvous instead of exiting
    assert answer(chat(launch, ODD, temperature=0)) == ODD_ANSWER
    log = launch.server.stderr()
    assert "attention 0 was killed by SIGKILL; restart 1 of 3" in log
    assert "waiting for the next one" in log
