"""Cross-machine AFD: the attention and FFN ranks run in two network namespaces joined by a
veth pair (two hosts as far as the network stack can tell), addressed by MASTER_ADDR and
GLOO_SOCKET_IFNAME. Oracle: the monolithic engine's greedy output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams

PROMPT = "1 3 5 7 9"


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = uuid.uuid4().hex[:6]
    a, f = f"afd-a-{tag}", f"afd-f-{tag}"
    if _ip("netns", "add", a).returncode != 0:
        pytest.skip("cannot create network namespaces here (needs root / CAP_SYS_ADMIN)")
    try:
        _ip("netns", "add", f)
        steps = [("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vf{tag}"),
                 ("link", "set", f"va{tag}", "netns", a), ("link", "set", f"vf{tag}", "netns", f),
                 ("-n", a, "addr", "add", "10.231.0.1/24", "dev", f"va{tag}"),
                 ("-n", f, "addr", "add", "10.231.0.2/24", "dev", f"vf{tag}"),
                 ("-n", a, "link", "set", f"va{tag}", "up"), ("-n", f, "link", "set", f"vf{tag}", "up"),
                 ("-n", a, "link", "set", "lo", "up"), ("-n", f, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot wire the namespaces: ip {' '.join(step)}: {r.stderr.strip()}")
        yield {"attention": (a, f"va{tag}"), "ffn": (f, f"vf{tag}")}
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", f)


def _in_netns(ns: str, ifname: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "10.231.0.1", "MASTER_PORT": "29641", "GLOO_SOCKET_IFNAME": ifname}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "afd_compile.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_attention_and_ffn_on_two_hosts(two_hosts, shipped_model):
    common = ["--model", str(shipped_model), "--enforce-eager", "--afd-size", "1A1F", "--rank", "0",
              "--connector-timeout", "120"]
    ffn = _in_netns(*two_hosts["ffn"], ["ffn", *common])  # starts first: waits for the attention host
    attention = _in_netns(*two_hosts["attention"], ["generate", "--role", "attention", *common, "--chat",
                                                    "--max-tokens", "8", PROMPT])
    try:
        out, err = attention.communicate(timeout=300)
        assert attention.returncode == 0, err
        assert ffn.wait(timeout=60) == 0, ffn.stderr.read()
    finally:
        for p in (ffn, attention):
            if p.poll() is None:
                p.kill()
    got = json.loads(out.splitlines()[-1])["text"]
    engine = LLMEngine(EngineConfig(model=shipped_model, enforce_eager=True, max_num_seqs=2))
    (ref,) = engine.generate([engine.encode_chat([{"role": "user", "content": PROMPT}])],
                             SamplingParams(temperature=0, max_tokens=8))
    assert got == ref.text
