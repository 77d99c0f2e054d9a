"""Real `afd serve` / `afd launch` / `afd ffn` processes for the server tests.

Each process runs in its own session (process group), logs to files (never a pipe that could
fill up and block it), and is stopped with SIGTERM, then SIGKILL of its whole group after a
grace period, so a test run never leaves a server behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from afd_compile.roles.launcher import die_with_parent, stop_process_group
from afd_compile.roles.rendezvous import free_port

SEED_MODEL_NAME = "/data2/models/deepseek-v2-lite"  # the model path in the seed README's curl request


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict | None]:
    """The `data:` events of a streaming response, parsed; None for the closing `data: [DONE]`."""
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            yield None
        elif line.startswith("data: "):
            yield json.loads(line[6:])


def _dies_with_parent() -> None:
    """die_with_parent's SIGTERM when the test dies, without its ignoring of SIGINT."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Proc:
    """One `python -m afd_compile.cli ...` child with its stdout/stderr in files."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 ctrl_c: bool = False):
        """ctrl_c: the process takes SIGINT as from a terminal (die_with_parent ignores it)."""
        self.name = name
        self.argv = [sys.executable, "-m", "afd_compile.cli", *args]
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        full_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env,
                                         start_new_session=True, preexec_fn=_dies_with_parent if ctrl_c else
                                         die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.stderr().splitlines()[-n:])

    def stop(self, grace_s: float = 10.0) -> None:
        stop_process_group(self.proc, grace_s)  # the group may still hold ranks it supervised


class Deployment:
    """A server (monolithic, or AFD ranks) reachable on http://127.0.0.1:port."""

    def __init__(self, name: str, port: int, procs: list[Proc], model: str, api_key: str | None = None):
        self.name, self.port, self.procs, self.model, self.api_key = name, port, procs, model, api_key
        self.url = f"http://127.0.0.1:{port}"
        self.ready = False

    @property
    def server(self) -> Proc:
        """The process that runs uvicorn (the last one started)."""
        return self.procs[-1]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str) -> float:
        """One sample of GET /metrics, e.g. `afd:kv_cache_usage_perc`."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=10).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_ready(self, timeout_s: float = 180.0) -> Deployment:
        """Polls GET /health until it answers 200; fails with the logs if a process exits or time runs out."""
        if self.ready:
            return self
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.proc.poll() is not None:
                    raise AssertionError(f"{self.name}: {p.name} exited with code {p.proc.returncode} before "
                                         f"/health answered:\n{p.tail()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2.0)
                if r.status_code == 200:
                    self.ready = True
                    return self
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)
        raise AssertionError(f"{self.name}: /health did not answer 200 within {timeout_s:.0f} s ({last})\n{logs}")

    def stop(self) -> None:
        for p in reversed(self.procs):  # the server first: attention ranks leave before FFN ranks
            p.stop()


def start_monolithic(model_dir: Path, log_dir: Path, name: str = "mono", extra: list[str] = ()) -> Deployment:
    port = free_port()
    args = ["serve", "--model", str(model_dir), "--enforce-eager", "--port", str(port), *extra]
    model = extra[extra.index("--served-model-name") + 1] if "--served-model-name" in extra else str(model_dir)
    api_key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
    return Deployment(name, port, [Proc(name, args, log_dir)], model, api_key)


def start_launch(model_dir: Path, log_dir: Path, afd_size: str = "1A1F", name: str = "launch",
                 extra: list[str] = (), ctrl_c: bool = False) -> Deployment:
    """`afd launch --afd-size ...`: one supervisor starting every rank; attention rank 0 serves on
    port. ctrl_c: the launcher takes SIGINT, as in a terminal."""
    port = free_port()
    args = ["launch", "--model", str(model_dir), "--afd-size", afd_size, "--enforce-eager", "--port", str(port), *extra]
    model = extra[extra.index("--served-model-name") + 1] if "--served-model-name" in extra else str(model_dir)
    return Deployment(name, port, [Proc(name, args, log_dir, env={"MASTER_PORT": str(free_port())}, ctrl_c=ctrl_c)],
                      model)


def start_afd_pair(model_dir: Path, log_dir: Path, name: str = "pair", extra: list[str] = (),
                   delay_us: float = 0) -> Deployment:
    """1A1F as two processes this test owns: `afd ffn --rank 0` and `afd serve --rank 0`."""
    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    common = ["--model", str(model_dir), "--afd-size", "1A1F", "--rank", "0", "--enforce-eager",
              "--connector-delay-us", str(delay_us)]
    ffn = Proc(f"{name}-ffn", ["ffn", *common], log_dir, env)
    attention = Proc(f"{name}-attention", ["serve", *common, "--port", str(port), *extra], log_dir, env)
    return Deployment(name, port, [ffn, attention], str(model_dir))
