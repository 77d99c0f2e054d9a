"""Start and stop the ranks of one deployment from the console, as supervised subprocesses.

Every rank is its own `python -m afd_compile.cli ...` child (argument lists, never a shell
string), in its own process group, so that stopping it also ends anything it started. Its
stdout and stderr are pumped line by line into a bounded buffer the Launch tab shows. A rank's
state is one of starting, ready, failed, stopped: an attention (or monolithic) rank is ready
when its /health answers 200; an FFN rank is ready once it runs and every attention rank is
ready (an attention rank only becomes healthy after the rendezvous with its FFN ranks).

`commands` gives the equivalent `afd` command lines, to start the same ranks by hand on other
machines.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from afd_compile.roles.launcher import die_with_parent, stop_process_group
from afd_compile.roles.store import SECRET_ENV, new_secret
from afd_compile.roles.rendezvous import free_port
from afd_compile.topology import Topology
from console import validate
from console.validate import ConsoleError

STATES = ("starting", "ready", "failed", "stopped")
COMPILE_LINE = re.compile(r"(compiled .* in [\d.]+ s|warm-up: .*)$")
LOG_LINES = 400

# Children get SIGTERM when the *thread* that started them ends (PR_SET_PDEATHSIG), and Gradio
# runs handlers on worker threads that end when idle: so every child is started from this one
# thread, which lives as long as the console.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-spawner")


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen(argv) in its own process group, ended with the console (even if it is SIGKILLed)."""
    kwargs = {"stdin": subprocess.DEVNULL, "start_new_session": True, "preexec_fn": die_with_parent, **popen_kwargs}
    return _SPAWNER.submit(subprocess.Popen, argv, **kwargs).result()


@dataclass(frozen=True)
class LaunchSpec:
    """A validated deployment: monolithic when topology is None."""

    model: Path
    topology: Topology | None
    micro_batches: int = 1
    connector: str = "gloo"
    enforce_eager: bool = False
    warmup: bool = True  # servers compile every decode shape before answering (`afd serve --no-warmup`: not)
    host: str = "127.0.0.1"
    port: int = 8000

    @classmethod
    def from_form(cls, model, afd_size, micro_batches, connector, enforce_eager, warmup, host, port) -> "LaunchSpec":
        """Validates the Launch tab's inputs; raises ConsoleError with a readable message."""
        topology = validate.afd_size(afd_size)
        return cls(model=validate.model_dir(model), topology=topology,
                   micro_batches=validate.micro_batches(micro_batches),
                   connector=validate.connector(connector), enforce_eager=bool(enforce_eager), warmup=bool(warmup),
                   host=validate.host(host),
                   port=validate.port(port, count=topology.num_attention if topology else 1))

    @property
    def name(self) -> str:
        return str(self.topology) if self.topology else validate.MONOLITHIC

    def engine_args(self) -> list[str]:
        out = ["--model", str(self.model)]
        if self.topology is not None:
            out += ["--afd-size", str(self.topology), "--micro-batches", str(self.micro_batches),
                    "--connector", self.connector]
        if self.enforce_eager:
            out.append("--enforce-eager")
        return out

    def rank_commands(self) -> list[tuple[str, list[str]]]:
        """(rank name, `afd` arguments) for every rank, FFN ranks first (either side may start first)."""
        server = self.server_args()
        if self.topology is None:
            return [("server", ["serve", *self.engine_args(), *server])]
        ranks = [(f"ffn {j}", ["ffn", *self.engine_args(), "--rank", str(j)]) for j in range(self.topology.num_ffn)]
        ranks += [(f"attention {i}", ["serve", *self.engine_args(), "--rank", str(i), *server])
                  for i in range(self.topology.num_attention)]
        return ranks

    def launch_args(self) -> list[str]:
        """The one-host equivalent: `afd launch` (or `afd serve` when monolithic)."""
        if self.topology is None:
            return self.rank_commands()[0][1]
        return ["launch", *self.engine_args(), *self.server_args()]

    def server_args(self) -> list[str]:
        cold = not self.warmup and not self.enforce_eager  # eager compiles nothing to warm up
        return ["--host", self.host, "--port", str(self.port)] + (["--no-warmup"] if cold else [])

    def url(self, attention_rank: int = 0) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port + attention_rank}"


def commands(spec: LaunchSpec, master_port: int | None = None) -> str:
    """Shell text with the equivalent CLI commands, one rank per line, to copy to other machines."""
    if spec.topology is None:
        return "# monolithic: one process\n" + shlex.join(["afd", *spec.launch_args()])
    # shared memory only joins ranks of one host: across machines the ranks talk over gloo
    across = replace(spec, connector="gloo") if spec.connector == "shm" else spec
    lines = ["# everything on one host:", shlex.join(["afd", *spec.launch_args()]), "",
             "# or one rank per line, on any machines (replace MASTER_ADDR with the address of the",
             "# machine that runs attention rank 0; every rank needs the same MASTER_ADDR/MASTER_PORT",
             "# and the same rendezvous secret, AFD_DIST_SECRET"
             + ("; --connector gloo: shm joins ranks of one host only" if across is not spec else "") + "):",
             f"export MASTER_ADDR=127.0.0.1 MASTER_PORT={master_port or 29500} AFD_DIST_SECRET={new_secret()}"]
    lines += [shlex.join(["afd", *args]) for _, args in across.rank_commands()]
    return "\n".join(lines)


@dataclass
class Rank:
    """One supervised child process."""

    name: str
    args: list[str]
    url: str | None = None  # /health of the server this rank runs, if it serves
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None
    stop_requested: bool = False
    healthy: bool = False
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "afd_compile.cli", *self.args]

    def start(self, env: dict[str, str]) -> None:
        self.proc = spawn(self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.started = time.monotonic()
        threading.Thread(target=self._pump, daemon=True, name=f"console log {self.name}").start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def state(self) -> str:
        rc = self.returncode
        if rc is None:
            return "ready" if self.healthy else "starting"
        if self.ended is None:
            self.ended = time.monotonic()
        return "stopped" if self.stop_requested or rc == 0 else "failed"

    def uptime(self) -> float:
        if self.proc is None:
            return 0.0
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def check_health(self, timeout_s: float = 0.5) -> bool:
        if self.url is None or self.returncode is not None:
            return False
        if not self.healthy:
            try:
                self.healthy = httpx.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
            except httpx.HTTPError:
                self.healthy = False
        return self.healthy

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the rank says goodbye to its peers), then SIGKILL of its whole group."""
        if self.proc is None:
            return
        self.stop_requested = True
        stop_process_group(self.proc, grace_s)
        self.state()


class Launcher:
    """The console's one deployment: start, status, logs, stop. Thread-safe for Gradio's workers."""

    def __init__(self, env: dict[str, str] | None = None):
        self.extra_env = env or {}
        self.spec: LaunchSpec | None = None
        self.ranks: list[Rank] = []
        self.master_port: int | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return any(r.returncode is None for r in self.ranks)

    def start(self, spec: LaunchSpec) -> list[Rank]:
        with self._lock:
            if self.running:
                raise ConsoleError(f"A deployment ({self.spec.name}) is already running: stop it first.")
            self.spec, self.master_port = spec, free_port()
            # one rendezvous secret for this deployment's ranks (the user's, else a new one)
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(self.master_port), SECRET_ENV: os.environ.get(SECRET_ENV) or new_secret(),
                   **self.extra_env}
            env.pop("MASTER_IP", None)
            self.ranks = []
            for name, args in spec.rank_commands():
                url = None
                if name == "server":
                    url = spec.url()
                elif name.startswith("attention"):
                    url = spec.url(int(name.split()[1]))
                rank = Rank(name, args, url)
                rank.start(env)
                self.ranks.append(rank)
            return self.ranks

    def stop(self) -> None:
        """Attention ranks first (they say goodbye to the FFN ranks), then FFN ranks."""
        with self._lock:
            for rank in reversed(self.ranks):
                rank.stop()

    def refresh(self) -> None:
        for r in self.ranks:
            r.check_health()
        servers = [r for r in self.ranks if r.url is not None]
        all_ready = bool(servers) and all(r.healthy for r in servers)
        for r in self.ranks:
            if r.url is None:
                r.healthy = all_ready and r.returncode is None

    def status_rows(self) -> list[list]:
        """[rank, pid, state, uptime s, endpoint] per rank."""
        self.refresh()
        return [[r.name, r.proc.pid if r.proc else None, r.state(), round(r.uptime(), 1), r.url or ""]
                for r in self.ranks]

    def summary(self) -> str:
        if not self.ranks:
            return "No deployment started."
        states = [r.state() for r in self.ranks]
        if all(s == "ready" for s in states):
            return f"**{self.spec.name} ready**: API at {self.spec.url()}/v1"
        if "failed" in states:
            failed = next(r for r in self.ranks if r.state() == "failed")
            tail = " | ".join(list(failed.log)[-3:]) or "no output"
            return f"**{failed.name} failed** (exit code {failed.returncode}): {tail}"
        if all(s == "stopped" for s in states):
            return f"{self.spec.name} stopped."
        starting = f"{self.spec.name} starting ({states.count('ready')}/{len(states)} ranks ready)…"
        compiling = [(r.name, line) for r in self.ranks if r.state() == "starting" for line in list(r.log)[-20:]
                     if COMPILE_LINE.search(line)]
        if compiling:  # the ranks' own INFO lines: "compiled decode step (...) in 14.2 s", "warm-up: ..."
            name, line = compiling[-1]
            return f"{starting} compiling the decode shapes before serving; {name}: {COMPILE_LINE.search(line).group(0)}"
        return starting

    def logs(self, rank: str | None = None, lines: int = 60) -> str:
        """The newest lines of one rank's log (newest last), or of every rank's, one block each."""
        parts = []
        for r in self.ranks:
            if rank is not None and r.name != rank:
                continue
            tail = list(r.log)[-lines:]
            if rank is None:
                parts.append(f"----- {r.name} (pid {r.proc.pid if r.proc else '-'}) -----")
            parts += tail or ["(no output yet)"]
        return "\n".join(parts)

    def wait_ready(self, timeout_s: float = 180.0, poll_s: float = 0.25) -> bool:
        """For scripts and tests: True once every rank is ready; False on a failure or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [row[2] for row in self.status_rows()]
            if states and all(s == "ready" for s in states):
                return True
            if "failed" in states or "stopped" in states:
                return False
            time.sleep(poll_s)
        return False
