"""Start and stop the ranks of one deployment from the console, under the CLI's Supervisor.

Every rank is its own `afd` child (a RankSpec's argument list, never a shell string), in its own
process group; the Launch tab shows the last lines of its log. A rank's state is one of
starting, ready, failed, stopped: an attention (or monolithic) rank is ready when its /health
answers 200; an FFN rank is ready once it runs and every attention rank is ready (an attention
rank only becomes healthy after the rendezvous with its FFN ranks).

`commands` gives the equivalent `afd` command lines, to start the same ranks by hand on other
machines.
"""

from __future__ import annotations

import os
import re
import shlex
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from afd_compile.roles.launcher import Child, Supervisor
from afd_compile.roles.rank_spec import RankSpec, deployment
from afd_compile.roles.rendezvous import free_port
from afd_compile.roles.store import SECRET_ENV, new_secret
from afd_compile.topology import Topology
from console import validate
from console.validate import ConsoleError

STATES = ("starting", "ready", "failed", "stopped")
COMPILE_LINE = re.compile(r"(compiled .* in [\d.]+ s|warm-up: .*)$")
STOP_GRACE_S = 10.0  # per stage: attention ranks, then FFN ranks


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

    @property
    def afd_size(self) -> str | None:
        return str(self.topology) if self.topology else None

    def options(self) -> list[str]:
        """The deployment's flags, the same on every rank (--afd-size is the RankSpec's)."""
        out = ["--model", str(self.model)]
        if self.topology is not None:
            out += ["--micro-batches", str(self.micro_batches), "--connector", self.connector]
        if self.enforce_eager:
            out.append("--enforce-eager")
        return out

    def rank_specs(self) -> list[RankSpec]:
        """Every rank, FFN ranks first (either side may start first); monolithic: the one server."""
        return deployment(self.afd_size, self.options(), attention="serve", attention_extra=self.server_args())

    def launch_args(self) -> list[str]:
        """The one-host equivalent: `afd launch` (or `afd serve` when monolithic)."""
        if self.topology is None:
            return self.rank_specs()[0].args()
        return ["launch", "--afd-size", self.afd_size, *self.options(), *self.server_args()]

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
    lines += [shlex.join(["afd", *rank.args()]) for rank in across.rank_specs()]
    return "\n".join(lines)


class Launcher:
    """The console's one deployment: start, status, logs, stop. Thread-safe for Gradio's workers."""

    def __init__(self, env: dict[str, str] | None = None):
        self.extra_env = env or {}
        self.spec: LaunchSpec | None = None
        self.supervisor: Supervisor | None = None
        self.urls: dict[str, str] = {}  # rank name -> the server it runs, whose /health says it is ready
        self.healthy: set[str] = set()
        self.master_port: int | None = None
        self._lock = threading.Lock()

    @property
    def ranks(self) -> list[Child]:
        return self.supervisor.children if self.supervisor else []

    @property
    def running(self) -> bool:
        return self.supervisor is not None and self.supervisor.running

    def start(self, spec: LaunchSpec) -> list[Child]:
        with self._lock:
            if self.running:
                raise ConsoleError(f"A deployment ({self.spec.name}) is already running: stop it first.")
            self.spec, self.master_port = spec, free_port()
            # one rendezvous secret for this deployment's ranks (the user's, else a new one)
            env = {"TRANSFORMERS_VERBOSITY": "error", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.master_port),
                   SECRET_ENV: os.environ.get(SECRET_ENV) or new_secret(), **self.extra_env}
            # the console supervises its ranks itself: failures show as failed, nothing restarts
            self.supervisor = Supervisor(env, relay_logs=False)
            self.supervisor.env.pop("MASTER_IP", None)
            self.urls, self.healthy = {}, set()
            for rank in spec.rank_specs():
                self.supervisor.start(rank.name, rank.argv())
                if rank.role != "ffn":
                    self.urls[rank.name] = spec.url(rank.rank)
            return self.ranks

    def stop(self) -> None:
        """Attention ranks first (they say goodbye to the FFN ranks), then FFN ranks."""
        with self._lock:
            if self.supervisor is not None:
                servers = [r.name for r in self.ranks if r.name in self.urls]
                self.supervisor.stop([(servers, STOP_GRACE_S),
                                      ([r.name for r in self.ranks if r.name not in self.urls], STOP_GRACE_S)])

    def state(self, rank: Child) -> str:
        rc = rank.returncode
        if rc is None:
            return "ready" if rank.name in self.healthy else "starting"
        return "stopped" if rank.stop_requested or rc == 0 else "failed"

    def refresh(self, timeout_s: float = 0.5) -> None:
        for r in self.ranks:
            if r.name in self.urls and r.name not in self.healthy and r.returncode is None:
                try:
                    if httpx.get(f"{self.urls[r.name]}/health", timeout=timeout_s).status_code == 200:
                        self.healthy.add(r.name)
                except httpx.HTTPError:
                    pass
        all_ready = bool(self.urls) and all(name in self.healthy for name in self.urls)
        for r in self.ranks:
            if r.name not in self.urls and all_ready and r.returncode is None:
                self.healthy.add(r.name)

    def status_rows(self) -> list[list]:
        """[rank, pid, state, uptime s, endpoint] per rank."""
        self.refresh()
        return [[r.name, r.proc.pid if r.proc else None, self.state(r), round(r.uptime(), 1), self.urls.get(r.name, "")]
                for r in self.ranks]

    def summary(self) -> str:
        if not self.ranks:
            return "No deployment started."
        states = [self.state(r) for r in self.ranks]
        if all(s == "ready" for s in states):
            return f"**{self.spec.name} ready**: API at {self.spec.url()}/v1"
        if "failed" in states:
            failed = next(r for r in self.ranks if self.state(r) == "failed")
            tail = " | ".join(list(failed.log)[-3:]) or "no output"
            return f"**{failed.name} failed** (exit code {failed.returncode}): {tail}"
        if all(s == "stopped" for s in states):
            return f"{self.spec.name} stopped."
        starting = f"{self.spec.name} starting ({states.count('ready')}/{len(states)} ranks ready)…"
        compiling = [(r.name, line) for r in self.ranks if self.state(r) == "starting" for line in list(r.log)[-20:]
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
