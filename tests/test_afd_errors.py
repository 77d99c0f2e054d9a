"""AFD bad input and failures: each ends with one clear error, within the timeout, no hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.connector.base import ConnectorError, heartbeat
from afd_compile.engine import SamplingParams
from afd_compile.errors import AfdError
from afd_compile.roles.rendezvous import free_port
from afd_compile.topology import Topology


def afd_cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "afd_compile.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("afd: error:")]
    assert line, proc.stderr
    for needle in needles:
        assert needle in line[0], line[0]


@pytest.mark.parametrize("bad", ["2X2F", "A2F", "0A1F", "2A0F", "two"])
def test_malformed_afd_size(bad):
    with pytest.raises(AfdError, match="afd_size"):
        Topology.parse(bad)


def test_topology_mapping_is_balanced_and_logged():
    topo = Topology.parse("3A2F")
    assert [topo.ffn_of(a) for a in range(3)] == [0, 0, 1]
    assert topo.attention_peers(1) == [2]
    assert Topology.parse("1a2f").attention_peers(1) == []  # A < F: the FFN all-to-all reaches it
    assert "attention 2 -> ffn 1" in topo.describe()


def test_cli_rejects_malformed_afd_size(tiny_greedy_checkpoint):
    assert_clean_error(afd_cli("generate", "--model", str(tiny_greedy_checkpoint), "--afd-size", "2X2F", "1 2"),
                       "2X2F", "xAyF")


def test_cli_rejects_unknown_role(tiny_greedy_checkpoint):
    assert_clean_error(afd_cli("generate", "--model", str(tiny_greedy_checkpoint), "--afd-size", "1A1F",
                               "--role", "router", "1 2"), "router")


def test_cli_rejects_experts_not_divisible(tiny_greedy_checkpoint):
    # 8 routed experts cannot be split over 3 FFN ranks.
    assert_clean_error(afd_cli("ffn", "--model", str(tiny_greedy_checkpoint), "--afd-size", "1A3F", "--rank", "0"),
                       "n_routed_experts=8", "3 FFN ranks")


def test_seed_additional_config_form_is_accepted_and_validated(tiny_greedy_checkpoint):
    proc = afd_cli("ffn", "--model", str(tiny_greedy_checkpoint), "--additional-config",
                   '{"role": "ffn", "afd_size": "2A3F", "rank": 0}')
    assert_clean_error(proc, "2A3F")
    assert_clean_error(afd_cli("ffn", "--model", str(tiny_greedy_checkpoint), "--additional-config", "{oops"),
                       "--additional-config")


def test_port_in_use(tiny_greedy_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = afd_cli("generate", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--afd-size", "1A1F",
                       "--connector-timeout", "10", "1 2", env={"MASTER_PORT": str(port)})
    assert_clean_error(proc, str(port), "in use")


def test_peer_that_never_comes_times_out(tiny_greedy_checkpoint):
    start = time.monotonic()
    proc = afd_cli("ffn", "--model", str(tiny_greedy_checkpoint), "--afd-size", "1A1F", "--rank", "0",
                   "--connector-timeout", "3", env={"MASTER_PORT": str(free_port())})
    assert_clean_error(proc, "rendezvous", "1A1F")
    assert time.monotonic() - start < 60


def _dying_ffn(port, model_dir, rounds_before_death):
    """An FFN rank whose process vanishes (as under kill -9) after a few rounds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from afd_compile.roles import ffn, worker

    original = ffn.FFNWorker._run_round
    count = [0]

    def run_round(self, *a):
        count[0] += 1
        if count[0] > rounds_before_death:
            os._exit(9)
        return original(self, *a)

    ffn.FFNWorker._run_round = run_round
    worker.run_ffn(EngineConfig(model=model_dir, enforce_eager=True), AFDConfig("1A1F", role="ffn", timeout_s=30))


def _attention(port, model_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from afd_compile.roles.worker import attention_engine

    engine, _ = attention_engine(EngineConfig(model=model_dir, enforce_eager=True, max_model_len=96),
                                 AFDConfig("1A1F", timeout_s=30))
    start = time.monotonic()
    try:
        engine.generate([[1, 5, 8, 6]], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        results.put(("finished", 0.0))
    except Exception as e:
        results.put((f"{type(e).__name__}: {e}", time.monotonic() - start))


def test_ffn_dying_mid_step_is_an_error_not_a_hang(tiny_greedy_checkpoint):
    """Oracle: the connector timeout is 30 s; a dead peer must be reported far sooner."""
    ctx = mp.get_context("fork")
    port, results = free_port(), ctx.Queue()
    ffn_proc = ctx.Process(target=_dying_ffn, args=(port, tiny_greedy_checkpoint, 5))
    attn_proc = ctx.Process(target=_attention, args=(port, tiny_greedy_checkpoint, results))
    ffn_proc.start(), attn_proc.start()
    try:
        message, elapsed = results.get(timeout=120)
    finally:
        for p in (ffn_proc, attn_proc):
            p.join(10)
            if p.is_alive():
                p.kill()
    assert message.startswith("ConnectorError"), message
    assert elapsed < 10, elapsed
    assert attn_proc.exitcode == 0  # the attention rank reported and exited on its own


def test_launcher_stops_the_other_ranks_when_one_fails(tiny_greedy_checkpoint):
    from afd_compile.roles.launcher import Supervisor
    from afd_compile.roles.rank_spec import afd_argv

    sup = Supervisor({"MASTER_PORT": str(free_port())}, relay_logs=False)
    # A healthy FFN rank that would wait 120 s for its attention peer ...
    waiting = sup.start("ffn 0", afd_argv(["ffn", "--afd-size", "1A1F", "--rank", "0", "--connector-timeout", "120",
                                           "--model", str(tiny_greedy_checkpoint)]))
    # ... and an attention rank that fails at once.
    sup.start("attention 0", afd_argv(["generate", "--afd-size", "1A1F", "--role", "attention", "--rank", "0",
                                       "--model", "/nonexistent-model-dir", "1 2"]))
    start = time.monotonic()
    with pytest.raises(AfdError, match="attention 0 exited with code 1.*does not exist"):
        sup.wait()
    assert waiting.proc.poll() is not None and time.monotonic() - start < 60


def test_seed_underscore_flags_are_accepted():
    from afd_compile.cli import normalize_flags

    assert normalize_flags(["ffn", "--enforce_eager", '--additional_config={"afd_size": "2A2F"}', "--", "--x_y"]) == [
        "ffn", "--enforce-eager", '--additional-config={"afd_size": "2A2F"}', "--", "--x_y"]


@pytest.mark.parametrize("kwargs,match", [(dict(connector_delay_us=-1), "delay must be >= 0"),
                                          (dict(connector="nccl", connector_delay_us=10), "not nccl")])
def test_bad_connector_delay_is_rejected(kwargs, match):
    from afd_compile.config import AFDConfig

    with pytest.raises(AfdError, match=match):
        AFDConfig(afd_size="1A1F", **kwargs)


def test_heartbeat_keeps_peers_posted_while_a_rank_compiles():
    """While a rank compiles a graph (tens of seconds on CPU) its peers hear from it every period,
    so they never see silence longer than that; a beat that fails (the links broke) is raised
    after the body, not lost."""
    beats = []
    with heartbeat(lambda: beats.append(time.monotonic()), period_s=0.05):
        time.sleep(0.4)
    assert len(beats) >= 4 and max(b - a for a, b in zip(beats, beats[1:])) < 0.3

    def broken():
        raise ConnectorError("the FFN rank is gone")

    with pytest.raises(ConnectorError, match="the FFN rank is gone"):
        with heartbeat(broken, period_s=0.01):
            time.sleep(0.05)
