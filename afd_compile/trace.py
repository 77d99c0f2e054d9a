"""Per-rank timeline in Chrome trace format (Perfetto opens it).

Each rank records complete events ("ph": "X") on its own wall clock (time.time_ns, shared by
all processes of one host); `merge` puts several ranks' files on one timeline. Disabled
tracers cost one attribute check per span.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path


class Tracer:
    def __init__(self, process_name: str, pid: int, enabled: bool = False):
        self.process_name, self.pid, self.enabled = process_name, pid, enabled
        self.events: list[dict] = []

    @contextmanager
    def span(self, name: str, cat: str, **args):
        if not self.enabled:
            yield
            return
        start = time.time_ns()
        try:
            yield
        finally:
            self._complete(name, cat, start, args)

    @contextmanager
    def compile_span(self, **args):
        """One "compile" span for what runs inside (a new shape compiling, and its run on loopback
        links), and none of the spans that run records: that time is neither attention nor FFN
        work of a step."""
        recording, self.enabled = self.enabled, False
        start = time.time_ns()
        try:
            yield
        finally:
            self.enabled = recording
            if recording:
                self._complete("compile", "compile", start, args)

    def _complete(self, name: str, cat: str, start_ns: int, args: dict) -> None:
        """A complete event ("ph": "X") from start_ns to now."""
        self.events.append({"name": name, "cat": cat, "ph": "X", "pid": self.pid, "tid": 0, "ts": start_ns / 1e3,
                            "dur": (time.time_ns() - start_ns) / 1e3, "args": args})

    def to_json(self) -> dict:
        meta = {"name": "process_name", "ph": "M", "pid": self.pid, "args": {"name": self.process_name}}
        return {"traceEvents": [meta, *self.events], "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


def merge(paths: list[str | Path], out: str | Path) -> dict:
    events = []
    for p in paths:
        events += json.loads(Path(p).read_text())["traceEvents"]
    merged = {"traceEvents": events, "displayTimeUnit": "ms"}
    Path(out).write_text(json.dumps(merged))
    return merged
