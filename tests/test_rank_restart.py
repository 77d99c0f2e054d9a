"""A rank of a running `afd launch --afd-size 1A1F` killed with SIGKILL: the launcher restarts
it, the survivors re-form the AFD world with it (a new rendezvous generation), and serving
resumes with the same greedy answers.

The FFN rank is stopped (SIGSTOP) mid-decode before it is killed, so the engine is provably
stuck in a step: the request being decoded is in flight (it must fail with 503 within 10 s), and
a request accepted meanwhile is queued, not started (it must be retried and complete).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from afd_compile.config import EngineConfig
from afd_compile.connector.base import ConnectorError
from afd_compile.engine import LLMEngine, SamplingParams
from afd_compile.engine.rank import Rank
from afd_compile.errors import AfdError
from afd_compile.roles import launcher
from afd_compile.roles.rank_spec import afd_argv
from afd_compile.serve.async_engine import AsyncEngine
from tests.server_fixtures import start_launch
from tests.test_server import ODD, ODD_ANSWER, assert_error, chat

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["gloo", "shm"])
def launch(request, shipped_model, tmp_path_factory):
    d = start_launch(shipped_model, tmp_path_factory.mktemp(f"restart-{request.param}"),
                     extra=["--connector", request.param])
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def rank_pid(launch, command: str, rank: int = 0) -> int:
    """The pid of the launcher's child running `afd <command> --rank <rank>` (ffn, or serve: attention)."""
    found = []
    for task in Path(f"/proc/{launch.server.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if argv[3] == command and argv[argv.index("--rank") + 1] == str(rank):
                found.append(int(pid))
    assert len(found) == 1, (command, rank, found)
    return found[0]


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def stream_chat(d, accepted: threading.Event, first_token: threading.Event, **params) -> tuple[list[dict], float]:
    """Streams a greedy chat completion of ODD, setting `accepted` on its 200 and `first_token` on
    its first chunk; returns its events and when the stream ended."""
    body = {"model": d.model, "messages": [{"role": "user", "content": ODD}], "stream": True, "temperature": 0,
            **params}
    events = []
    with httpx.stream("POST", f"{d.url}/v1/chat/completions", json=body, timeout=150) as r:
        assert r.status_code == 200
        accepted.set()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                first_token.set()
    return events, time.monotonic()


def content(events: list[dict]) -> str:
    assert "error" not in events[-1], events[-1]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


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
    ffn = rank_pid(launch, "ffn")
    a_accepted, a_decoding, b_accepted, b_started = (threading.Event() for _ in range(4))
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(stream_chat, launch, a_accepted, a_decoding, max_tokens=480, ignore_eos=True)
        assert a_decoding.wait(60)
        os.kill(ffn, signal.SIGSTOP)  # its next step now waits for the FFN rank
        queued = pool.submit(stream_chat, launch, b_accepted, b_started)
        assert b_accepted.wait(60) and not b_started.is_set()  # queued: the engine is stuck in the step
        os.kill(ffn, signal.SIGKILL)
        killed = time.monotonic()

        events, ended = in_flight.result(timeout=30)
        assert ended - killed < 10
        assert events[-1]["error"]["type"] == "service_unavailable", events[-1]
        assert events[-1]["error"]["code"] == 503
        health = wait_health(launch, 503, 10)
        assert health["status"] == "degraded", health
        assert_error(chat(launch, ODD, temperature=0, timeout=10), 503)  # new requests: refused while down

        assert wait_health(launch, 200, 120)["status"] == "ok"
        assert content(queued.result(timeout=60)[0]) == ODD_ANSWER  # retried after the reconnect, not lost
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


@pytest.mark.slow
def test_2a2f_serves_again_after_any_rank_is_killed(shipped_model, tmp_path):
    """Oracle: both attention ranks' greedy answer after each of the four ranks in turn is killed;
    only the killed rank's process is new (the others waited for it)."""
    d = start_launch(shipped_model, tmp_path, afd_size="2A2F").wait_ready()
    urls = [d.url, f"http://127.0.0.1:{d.port + 1}"]
    ranks = [("ffn", 0), ("ffn", 1), ("serve", 0), ("serve", 1)]
    try:
        for victim in [("ffn", 1), ("serve", 1), ("serve", 0), ("ffn", 0)]:
            before = {r: rank_pid(d, *r) for r in ranks}
            os.kill(before[victim], signal.SIGKILL)
            for url in urls:
                assert serves_again(d, url) == ODD_ANSWER
            after = {r: rank_pid(d, *r) for r in ranks}
            assert {r for r in ranks if after[r] != before[r]} == {victim}
    finally:
        d.stop()


def serves_again(d, url: str, timeout_s: float = 120) -> str:
    """The first greedy answer to ODD that `url` gives once its deployment has re-formed."""
    body = {"model": d.model, "messages": [{"role": "user", "content": ODD}], "temperature": 0}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            if r.status_code == 200:
                return answer(r)
        except httpx.HTTPError:
            pass  # restarting
        assert time.monotonic() < deadline, f"{url} did not serve again within {timeout_s} s"
        time.sleep(0.3)


# ---------------------------------------------------------------- the pieces, without processes


def test_launcher_restarts_a_failed_rank_then_gives_up(monkeypatch):
    """Oracle: a rank that fails every time is started max_restarts more times, then the launcher
    stops with its error and the restart count."""
    monkeypatch.setattr(launcher, "RESTART_BACKOFF_S", (0.05, 0.1))
    sup = launcher.Supervisor({}, relay_logs=False, max_restarts=2)
    child = sup.start("ffn 0", afd_argv(["ffn"]))  # no --afd-size: exits 1 at once
    with pytest.raises(AfdError, match=r"ffn 0 exited with code 1: afd ffn needs --afd-size.*after 2 restart"):
        sup.wait()
    assert child.restarts == 2


def test_launcher_restart_count_resets_after_a_long_run(monkeypatch, tmp_path):
    """Oracle: a rank that fails only after running RESTART_RESET_S each time is restarted past
    max_restarts (its failures are not in a row), and its backoff starts over."""
    monkeypatch.setattr(launcher, "RESTART_BACKOFF_S", (0.05, 0.1))
    monkeypatch.setattr(launcher, "RESTART_RESET_S", 0.2)
    runs = tmp_path / "runs"
    script = (f"import pathlib, time; p = pathlib.Path({str(runs)!r}); p.write_text(p.read_text() + 'x' "
              f"if p.exists() else 'x'); time.sleep(0.3); raise SystemExit(0 if len(p.read_text()) == 4 else 1)")
    sup = launcher.Supervisor({}, relay_logs=False, max_restarts=1)
    child = launcher.Child("ffn 0", [sys.executable, "-c", script])
    sup._spawn(child)
    sup.children.append(child)
    sup.wait()  # three failures, each after a long enough run, then success
    assert runs.read_text() == "xxxx" and child.restarts == 1


PROMPT = [1, 5, 8, 6]


@pytest.fixture
def flaky_engine(tiny_greedy_checkpoint):
    """A monolithic engine whose decode steps fail while `broken` is set, as an attention rank's
    do while its FFN rank is dead; and the greedy tokens of PROMPT without failures."""
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_num_seqs=1))
    reference = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids
    broken, decode = threading.Event(), engine.runner.decode

    def run(seqs):
        if broken.is_set():
            raise ConnectorError("the peer process is gone")
        time.sleep(0.01)  # keeps the long request in flight while the test breaks the link
        return decode(seqs)

    engine.runner.decode = run
    return engine, broken, reference


def fail_running_then_reconnect(engine, broken, reconnect) -> tuple[list, list]:
    """Runs a long request (in flight) and a short one (queued: one KV slot), breaks the link, and
    returns both requests' deltas once the server is healthy again (within 10 s)."""
    class Reconnecting(Rank):
        has_peers = True

        def reconnect(self):
            reconnect()

    async_engine = AsyncEngine(lambda: (engine, Reconnecting()))

    async def main():
        async def collect(max_tokens):
            return [d async for d in async_engine.generate(PROMPT, SamplingParams(
                temperature=0, max_tokens=max_tokens, ignore_eos=True))]

        async def until(condition):
            while not condition():
                await asyncio.sleep(0.005)

        running = asyncio.ensure_future(collect(100))
        await until(lambda: engine.scheduler.running)
        queued = asyncio.ensure_future(collect(8))
        await until(lambda: engine.scheduler.waiting)
        broken.set()
        deltas = await asyncio.wait_for(asyncio.gather(running, queued), 30)
        await asyncio.wait_for(until(lambda: async_engine.healthy), 10)
        return deltas

    try:
        return asyncio.run(main())
    finally:
        async_engine.close()


def test_reconnect_fails_running_requests_and_retries_queued_ones(flaky_engine):
    """Oracle: the greedy tokens of the queued request, computed without a failure."""
    engine, broken, reference = flaky_engine
    running, queued = fail_running_then_reconnect(engine, broken, broken.clear)
    assert "the peer process is gone" in running[-1].error
    assert queued[-1].error is None and queued[-1].finish_reason == "length"
    assert [t for d in queued for t in d.token_ids] == reference
    assert engine.scheduler.block_manager.usage() == 0


def test_queued_requests_fail_when_a_reconnect_attempt_fails(flaky_engine):
    """Oracle: a queued request waits for one reconnect attempt (bounded by the connector
    timeout), no longer; the engine keeps trying and serves again once an attempt succeeds."""
    engine, broken, _ = flaky_engine
    attempts = []

    def reconnect():
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise AfdError("no new generation of the AFD world opened within 60 s")
        broken.clear()

    running, queued = fail_running_then_reconnect(engine, broken, reconnect)
    assert "the peer process is gone" in running[-1].error
    assert "re-forming the AFD world failed: no new generation" in queued[-1].error
    assert len(attempts) == 2 and engine.scheduler.block_manager.usage() == 0
