"""`afd generate --afd-size` through real subprocesses, with the merged Chrome trace."""

from __future__ import annotations

import json
import subprocess
import sys

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams

PROMPTS = ["1 3 5 7 9", "40 30 20", "7 14 21", "500 501 502"]  # two per attention rank


def test_generate_2a2f_matches_monolithic_and_writes_trace(shipped_model, tmp_path):
    trace = tmp_path / "afd.json"
    proc = subprocess.run([sys.executable, "-m", "afd_compile.cli", "generate", "--model", str(shipped_model),
                           "--enforce-eager", "--chat", "--max-tokens", "8", "--afd-size", "2A2F",
                           "--micro-batches", "2", "--connector", "shm", "--trace", str(trace), *PROMPTS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    engine = LLMEngine(EngineConfig(model=shipped_model, enforce_eager=True, max_num_seqs=4))
    refs = engine.generate([engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=8))
    assert proc.stdout.splitlines() == [r.text.strip() for r in refs]

    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    by_rank = {e["pid"] for e in events}
    assert by_rank == {0, 1, 2, 3}  # 2 attention + 2 FFN ranks on one timeline
    names = {(e["cat"], e["name"]) for e in events}
    assert {("attention", "attention"), ("attention", "send"), ("attention", "wait"), ("ffn", "ffn"),
            ("ffn", "wait"), ("ffn", "send")} <= names
    layers = {e["args"]["layer"] for e in events if e["name"] == "ffn"}
    assert layers == set(range(4))
    assert {e["args"]["micro_batch"] for e in events if e["name"] == "attention"} == {0, 1}


def test_launch_with_warmup_compiles_before_serving(tiny_greedy_checkpoint, tmp_path):
    """`afd launch` (compiled, not eager; warm-up is the default): the attention rank it starts compiles every
    decode shape with its FFN rank before its server answers, then serves the greedy tokens of
    eager monolithic."""
    import httpx

    from afd_compile.roles.rendezvous import free_port
    from tests.server_fixtures import Deployment, Proc

    port = free_port()
    args = ["launch", "--model", str(tiny_greedy_checkpoint), "--afd-size", "1A1F", "--connector", "shm",
            "--max-num-seqs", "2", "--max-model-len", "64", "--port", str(port), "--log-level", "INFO"]
    server = Deployment("warm", port, [Proc("warm", args, tmp_path, env={"MASTER_PORT": str(free_port())})],
                        str(tiny_greedy_checkpoint))
    try:
        server.wait_ready(timeout_s=240)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "1 3 5 7 9",
                                                           "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        log = server.server.stderr()
        warm = log.index("warm-up: decode steps over 64 positions ready")
        assert warm < log.index("Application startup complete")
    finally:
        server.stop()
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_num_seqs=2, max_model_len=64))
    want = engine.generate(["1 3 5 7 9"], SamplingParams(temperature=0, max_tokens=6))[0].text
    assert r.json()["choices"][0]["text"] == want
