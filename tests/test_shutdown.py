"""Planned stops of a deployment: SIGTERM (or Ctrl-C) lets running streams finish, or ends them
with finish_reason "abort" at the server's deadline, and stops FFN ranks after their attention
peers, with no 503, no cut stream and no traceback (issue 21, item 4)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx

from tests.server_fixtures import Proc, start_launch


def _streams(url: str, count: int, max_tokens: int) -> tuple[list[dict], threading.Event, list[threading.Thread]]:
    """count streaming completions in threads; each result records its finish reason, whether it
    ended with [DONE], and any error event or status."""
    results = [{"finish": None, "done": False, "error": None, "tokens": 0} for _ in range(count)]
    started = threading.Barrier(count + 1)

    def stream(r: dict) -> None:
        body = {"prompt": "1 3 5", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
        first = True
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
                if resp.status_code != 200:
                    r["error"] = f"{resp.status_code} {resp.read()[:200]!r}"
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        r["done"] = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            r["error"] = chunk["error"]["message"]
                        elif chunk["choices"]:
                            r["tokens"] += 1
                            r["finish"] = chunk["choices"][0]["finish_reason"] or r["finish"]
                        if first:
                            first = False
                            started.wait(60)
        except httpx.HTTPError as e:
            r["error"] = repr(e)
        finally:
            if first:
                started.abort()

    threads = [threading.Thread(target=stream, args=(r,)) for r in results]
    for t in threads:
        t.start()
    return results, started, threads


def _assert_no_traceback(*procs: Proc) -> None:
    """A planned stop reads as one: no traceback, no ERROR line, no re-forming of the world."""
    for p in procs:
        log = p.stderr()
        assert "Traceback" not in log and "terminate called" not in log, f"{p.name}:\n{p.tail(60)}"
        assert " ERROR " not in log and "re-forming" not in log, f"{p.name}:\n{p.tail(60)}"


def test_ctrl_c_on_launch_lets_every_stream_finish_then_stops_ffn_after_attention(shipped_model, tmp_path):
    """2A1F under `afd launch`: streams on both attention ranks run when Ctrl-C (SIGINT to the
    whole process group, as a terminal sends it) arrives; every one finishes with finish_reason
    "length" and [DONE], the launcher exits 0 and no rank is killed or logs an ERROR or a
    traceback. (SIGTERM to the launcher: the next test.)"""
    # 1 ms a link message: the streams run on for seconds after the SIGTERM.
    d = start_launch(shipped_model, tmp_path, afd_size="2A1F", name="stop-launch", extra=["--connector-delay-us", "1000"],
                     ctrl_c=True)
    try:
        d.wait_ready(180)
        second = d.url.rsplit(":", 1)[0] + f":{d.port + 1}"
        d_second = httpx.get(f"{second}/health", timeout=5)
        assert d_second.status_code == 200
        results, started, threads = [], [], []
        for url in (d.url, second):
            r, s, t = _streams(url, 2, 300)
            results += r
            started.append(s)
            threads += t
        for s in started:
            s.wait(60)
        os.killpg(d.server.proc.pid, signal.SIGINT)
        for t in threads:
            t.join(90)
        assert [(r["finish"], r["done"], r["error"]) for r in results] == [("length", True, None)] * 4
        assert d.server.proc.wait(150) == 0  # attention 45 s, FFN 45 s at most: a kill shows in the log below
        log = d.server.stderr()
        assert "killing it" not in log and "exited with code" not in log, d.server.tail(60)
        _assert_no_traceback(d.server)
    finally:
        d.stop()


def test_streams_still_running_at_the_deadline_end_with_abort(shipped_model, tmp_path):
    """A stream longer than --timeout-graceful-shutdown ends with finish_reason "abort" and
    [DONE] before the deadline, not a cut connection; a new connection meanwhile is refused."""
    # 4 ms a link message: a 400-token stream outlasts a 4 s grace period.
    d = start_launch(shipped_model, tmp_path, afd_size="1A1F", name="stop-deadline",
                     extra=["--timeout-graceful-shutdown", "4", "--connector-delay-us", "4000"])
    try:
        d.wait_ready(180)
        results, started, threads = _streams(d.url, 2, 400)
        started.wait(60)
        t0 = time.monotonic()
        d.server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # the server accepts no new connection
            late = httpx.get(f"{d.url}/health", timeout=5).status_code
        except httpx.ConnectError:
            late = "refused"
        assert late == "refused"
        for t in threads:
            t.join(60)
        assert time.monotonic() - t0 < 6
        assert [(r["finish"], r["done"], r["error"]) for r in results] == [("abort", True, None)] * 2
        assert all(0 < r["tokens"] < 400 for r in results)
        assert d.server.proc.wait(60) == 0
        _assert_no_traceback(d.server)
    finally:
        d.stop()


def test_sigterm_on_an_ffn_rank_waits_for_its_attention_peer(shipped_model, tmp_path):
    """`afd ffn --rank 0` told to stop while its attention rank serves keeps serving it: a
    running stream still finishes; once the attention rank stops, the FFN rank exits 0."""
    from tests.server_fixtures import start_afd_pair

    d = start_afd_pair(shipped_model, tmp_path, name="stop-ffn", delay_us=1000)
    ffn, attention = d.procs
    try:
        d.wait_ready(180)
        results, started, threads = _streams(d.url, 1, 300)
        started.wait(60)
        ffn.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert [(r["finish"], r["done"], r["error"]) for r in results] == [("length", True, None)]
        assert ffn.proc.poll() is None, "the FFN rank left while its attention peer was serving"
        attention.proc.send_signal(signal.SIGTERM)
        assert attention.proc.wait(60) == 0
        assert ffn.proc.wait(30) == 0
        assert "serving the attention ranks until they leave" in ffn.stderr()
        _assert_no_traceback(ffn, attention)
    finally:
        d.stop()
