"""Starts ranks as supervised child processes on one host: the one supervisor of `afd launch`,
`afd serve`/`afd ffn` without --rank, `afd generate --afd-size` and the console.

Children get argument lists (never shell strings) and their own MASTER_ADDR/MASTER_PORT, each in
its own process group (stopping a rank also ends what it started: inductor's compile workers).
Their output is kept line by line (the last LOG_LINES) and, for the CLI, relayed with a
`[role rank]` prefix. A child that fails is
started again, after a backoff, up to `max_restarts` times in a row (as torchrun's
--max-restarts); the surviving ranks wait for it in the rendezvous. Past that, the others are
stopped and the failure is reported with the child's last log lines. A child that ran for
RESTART_RESET_S before failing starts a fresh count, so a long-lived server survives occasional
failures spread over its lifetime (as Kubernetes resets its crash-loop backoff).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from afd_compile.errors import AfdError

log = logging.getLogger("afd.launcher")

RESTART_BACKOFF_S = (1.0, 30.0)  # wait before the first restart of a child, doubling up to the max
RESTART_RESET_S = 600.0  # a child that ran this long before failing has its restart count and backoff reset
LOG_LINES = 400

# Children get SIGTERM when the *thread* that started them ends (PR_SET_PDEATHSIG), and callers
# such as Gradio run handlers on worker threads that end when idle: so every child is started
# from this one thread, which lives as long as the process.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afd-spawner")


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen(argv) in its own process group, ended with this process (even if it is SIGKILLed)."""
    kwargs = {"stdin": subprocess.DEVNULL, "start_new_session": True, "preexec_fn": die_with_parent, **popen_kwargs}
    return _SPAWNER.submit(subprocess.Popen, argv, **kwargs).result()


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))  # stderr, and stdout unless it is data
    stdout_lines: list[str] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)
    restarts: int = 0  # in a row: since it last ran RESTART_RESET_S
    restart_at: float | None = None  # failed: when it is started again
    started_at: float = 0.0
    ended_at: float | None = None
    stop_requested: bool = False

    @property
    def returncode(self) -> int | None:
        rc = None if self.proc is None else self.proc.poll()
        if rc is not None and self.ended_at is None:
            self.ended_at = time.monotonic()
        return rc

    def uptime(self) -> float:
        if self.proc is None:
            return 0.0
        _ = self.returncode  # notes the end
        return (self.ended_at if self.ended_at is not None else time.monotonic()) - self.started_at


class Supervisor:
    def __init__(self, env: dict[str, str], relay_logs: bool = True, capture_stdout: tuple[str, ...] = (),
                 max_restarts: int = 0):
        self.env = {**os.environ, **env}
        self.children: list[Child] = []
        self.relay_logs = relay_logs
        self.capture_stdout = capture_stdout  # children whose stdout is data, not log
        self.max_restarts = max_restarts  # per child, in a row; 0 (a batch job): one failure stops everyone

    @property
    def running(self) -> bool:
        return any(c.returncode is None for c in self.children)

    def start(self, name: str, argv: list[str]) -> Child:
        """Starts argv (a RankSpec's argv(), or any command) as child `name`."""
        child = Child(name, argv)
        self._spawn(child)
        self.children.append(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.proc = spawn(child.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, bufsize=1)
        child.started_at, child.ended_at = time.monotonic(), None
        is_data = child.name in self.capture_stdout
        child.pumps = [threading.Thread(target=self._pump, args=(child, child.proc.stderr, False), daemon=True),
                       threading.Thread(target=self._pump, args=(child, child.proc.stdout, is_data), daemon=True)]
        for pump in child.pumps:
            pump.start()

    def _pump(self, child: Child, stream, is_data: bool) -> None:
        for line in stream:
            if is_data:
                child.stdout_lines.append(line)
                continue
            child.log.append(line.rstrip("\n"))
            if self.relay_logs:
                print(f"[{child.name}] {line}", end="", file=sys.stderr, flush=True)

    def wait(self, names: list[str] | None = None, poll_s: float = 0.05) -> None:
        """Waits until the named children (default: all) exit 0, restarting failed ones while their
        restarts last; a failure past that stops everyone.
        SIGTERM to the supervisor stops the children too (and surfaces as KeyboardInterrupt)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        waiting = [c for c in self.children if names is None or c.name in names]
        while True:
            for child in self.children:
                self._check(child)
            if all(c.proc.poll() == 0 for c in waiting):
                for c in waiting:
                    for pump in c.pumps:
                        pump.join()
                return
            time.sleep(poll_s)

    def _check(self, child: Child) -> None:
        """Schedules a failed child's restart, starts it when due, or gives up on it."""
        rc = child.proc.poll()
        if rc in (None, 0):
            return
        if child.restart_at is None:
            reason = _failure(child, rc)
            if time.monotonic() - child.started_at >= RESTART_RESET_S:
                child.restarts = 0  # it ran well for a while: earlier failures no longer count
            if child.restarts >= self.max_restarts:
                self.stop()
                raise AfdError(reason + (f" (after {child.restarts} restart(s))" if child.restarts else ""))
            delay = min(RESTART_BACKOFF_S[0] * 2**child.restarts, RESTART_BACKOFF_S[1])
            log.warning("%s; restart %d of %d in %.0f s", reason, child.restarts + 1, self.max_restarts, delay)
            child.restart_at = time.monotonic() + delay
        elif time.monotonic() >= child.restart_at:
            child.restarts, child.restart_at = child.restarts + 1, None
            child.log.clear()  # its failure is told from this run's lines
            self._spawn(child)

    def stop(self, stages: list[tuple[list[str], float]] | None = None) -> None:
        """Stops the children in stages of (names, grace_s): each stage's children get SIGTERM
        together and grace_s to exit (a server finishing its streams, an FFN rank its peers'
        goodbyes) before SIGKILL, and the next stage starts only then. Default: everyone at once,
        with 5 s."""
        for names, grace_s in stages or [([c.name for c in self.children], 5.0)]:
            stage = [c for c in self.children if c.name in names]
            for child in stage:
                child.stop_requested = True
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in stage:
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s of SIGTERM; killing it", child.name, grace_s)
                _kill_group(child.proc)


def _failure(child: Child, rc: int) -> str:
    if rc < 0:  # killed: its last log lines are not the reason
        return f"{child.name} was killed by {signal.Signals(-rc).name}"
    # The child's own one-line error says it best; otherwise its last log lines.
    tail = list(child.log)
    errors = [ln.removeprefix("afd: error: ") for ln in tail if ln.startswith("afd: error:")]
    detail = errors[-1] if errors else " | ".join(tail[-3:]) or "no output"
    return f"{child.name} exited with code {rc}: {detail}"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM (a rank says goodbye to its peers), then SIGKILL of the process's whole group:
    whatever ranks it supervised go too. For children started by spawn (their own group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies, even by SIGKILL (Linux);
    ignore SIGINT, so a Ctrl-C in the terminal (sent to the whole process group) reaches only the
    supervisor, which stops the ranks in order (Python keeps an ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: children outlive a killed supervisor
