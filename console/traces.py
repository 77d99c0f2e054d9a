"""Record a few decode steps of an AFD deployment and show every rank on one timeline.

With an AFD deployment running (Launch tab), "Record" asks it for its next N steps through
`POST /debug/trace` on attention rank 0 once a few chat requests keep it busy: every rank of
the running system records those steps, the FFN ranks hand theirs over through the rendezvous
store, and the merged Chrome trace comes back (record_live).

With nothing running, it runs a short separate deployment with the Launch tab's settings:

    afd generate --afd-size X --micro-batches m --connector c --trace FILE --max-tokens N+1 --chat -- PROMPTS

which starts every rank, generates, exits, and merges the ranks' traces into FILE
(roles/generate.py), on its own rendezvous port, with --ignore-eos: its first step is the
prefill, the N after it are decode steps.

The plot (plotly: zoom, pan, hover) has one row per rank and one bar per span (attention / send
/ wait / ffn) for each layer and micro-batch; the summary gives time per stage and how well the
two sides overlap.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

from afd_compile.roles.launcher import spawn
from afd_compile.roles.rank_spec import afd_argv
from afd_compile.roles.rendezvous import free_port
from console.launcher import LaunchSpec
from console.validate import ConsoleError

# Chat prompts the shipped model knows; repeated so that every micro-batch gets rows.
PROMPTS = ("1 3 5 7 9", "2 4 6 8", "10 20 30 40", "9 8 7 6", "5 10 15 20", "3 6 9 12", "100 200 300", "7 14 21 28")
STAGE_COLORS = {"attention": "#1f77b4", "ffn": "#2ca02c", "send": "#ff7f0e", "wait": "#c7c7c7",
                "compile": "#d62728"}
COMPUTE = ("attention", "ffn")


def record_args(spec: LaunchSpec, steps: int, trace_path: str | Path) -> list[str]:
    """`afd` arguments of the recording run."""
    if spec.topology is None:
        raise ConsoleError("Traces show the AFD timeline: set an AFD size such as 1A1F or 2A2F (not monolithic).")
    n_prompts = max(2, 2 * spec.micro_batches * spec.topology.num_attention)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)]
    return ["generate", "--afd-size", spec.afd_size, *spec.options(), "--trace", str(trace_path), "--max-tokens", str(steps + 1),
            "--ignore-eos", "--chat", "--", *prompts]


def record(spec: LaunchSpec, steps: int, trace_path: str | Path, timeout_s: float = 600.0) -> Path:
    """Runs the recording deployment; returns the merged trace path or raises ConsoleError."""
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    argv = afd_argv(record_args(spec, steps, trace_path))
    proc = spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ConsoleError(f"Recording did not finish within {timeout_s:.0f} s.") from None
    if proc.returncode != 0 or not trace_path.exists():
        tail = "\n".join((stderr or stdout).strip().splitlines()[-5:]) or "no output"
        raise ConsoleError(f"Recording failed (exit code {proc.returncode}):\n{tail}")
    return trace_path


def record_live(url: str, steps: int, trace_path: str | Path, api_key: str | None = None,
                timeout_s: float = 60.0) -> Path:
    """Records the next `steps` steps of the deployment serving `url`; streamed chat requests
    drive them, and the recording is asked for once the first of them runs (the server answers
    409 while nothing runs)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    running, stop = threading.Event(), threading.Event()

    def drive(prompt: str, max_tokens: int) -> None:
        # Request after request until the recording is done: a request that ended before the
        # server took the trace command would leave nothing running to record (a 409).
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        while not stop.is_set():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                              timeout=timeout_s) as r:
                if r.status_code != 200:
                    raise ConsoleError(f"The deployment refused a chat request ({r.status_code}): "
                                       f"{r.read().decode(errors='replace')[:300]}")
                for _ in r.iter_lines():
                    running.set()
                    if stop.is_set():  # closing the stream aborts the request
                        return

    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]
        # as long as the context allows (the prompts and chat template take well under 64 tokens)
        max_tokens = max(1, models["max_model_len"] - 64)
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            load = [pool.submit(drive, prompt, max_tokens) for prompt in PROMPTS]
            try:
                while not running.wait(0.1):
                    if all(f.done() for f in load):
                        load[0].result()  # it failed: say why
                        raise ConsoleError(f"The deployment at {url} ran none of the chat requests that drive the "
                                           "recording.")
                r = httpx.post(f"{url}/debug/trace", json={"steps": steps, "timeout": timeout_s}, headers=headers,
                               timeout=timeout_s + 30)
            finally:
                stop.set()
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConsoleError(f"Could not reach the deployment at {url}: {e}") from None
    if r.status_code != 200:
        raise ConsoleError(f"The deployment refused to record ({r.status_code}): {r.text[:300]}")
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    trace_path.write_text(r.text)
    return trace_path


@dataclass(frozen=True)
class Span:
    rank: str  # process name, e.g. "attention 0"
    stage: str  # attention, send, wait, ffn; compile (a new shape compiling: no step of its own)
    layer: int
    micro_batch: int
    step: int  # numbered 0..N-1 in the recording (-1 for compile spans)
    start_ms: float
    dur_ms: float
    phase: str = "decode"  # or "prefill"

    @property
    def end_ms(self) -> float:
        return self.start_ms + self.dur_ms

    @property
    def role(self) -> str:
        return self.rank.split()[0]


def load_spans(trace: dict | str | Path) -> list[Span]:
    """The complete events of a merged Chrome trace, on one clock starting at 0 ms, their steps
    numbered 0..N-1 in the order they ran (the engine's own step counter goes on from start-up)."""
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    events = trace.get("traceEvents", [])
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    complete = [e for e in events if e.get("ph") == "X"]
    if not complete:
        return []
    t0 = min(e["ts"] for e in complete)
    numbered = {s: i for i, s in enumerate(sorted({int(e["args"]["step"]) for e in complete
                                                   if "step" in e.get("args", {}) and e["name"] != "compile"}))}
    spans = []
    for e in complete:
        a = e.get("args", {})
        step = -1 if e["name"] == "compile" or "step" not in a else numbered[int(a["step"])]
        spans.append(Span(rank=names.get(e["pid"], f"rank {e['pid']}"), stage=e["name"], layer=int(a.get("layer", 0)),
                          micro_batch=int(a.get("micro_batch", 0)), step=step,
                          start_ms=(e["ts"] - t0) / 1e3, dur_ms=e["dur"] / 1e3, phase=a.get("phase", "decode")))
    return sorted(spans, key=lambda s: s.start_ms)


def step_count(spans: list[Span]) -> int:
    return len({s.step for s in spans if s.step >= 0})


def rank_order(spans: list[Span]) -> list[str]:
    """Attention ranks first, then FFN ranks, each by number."""
    def key(name: str):
        role, _, num = name.partition(" ")
        return (0 if role == "attention" else 1, int(num) if num.isdigit() else 0, name)

    return sorted({s.rank for s in spans}, key=key)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def select_steps(spans: list[Span], first: int | None = None, last: int | None = None) -> list[Span]:
    """The spans of steps first..last (numbered as load_spans does); compile spans only when
    the range is the whole recording."""
    if first is None and last is None:
        return spans
    return [s for s in spans if s.step >= 0 and (first is None or s.step >= first) and (last is None or s.step <= last)]


def summary(spans: list[Span]) -> tuple[list[list], dict]:
    """Rows [rank, stage, spans, total ms, mean ms, % of window] and overall metrics over the
    steps (compile spans are counted apart, in compile_ms, and are outside the window):
    window_ms, attention_ms and ffn_ms (time any rank of that side computes), overlap_ms (time
    both sides compute at once), overlap_efficiency = overlap_ms / min(attention_ms, ffn_ms)
    (1.0: the shorter side is fully hidden behind the other; 0 for strictly alternating
    sides, as with one micro-batch), and busy[rank] = that rank's compute time / window.
    Overlap is measured on the steps that ran with 2 or more micro-batches where there are any
    (overlap_steps, micro_batches): one micro-batch cannot overlap."""
    compile_ms = sum(s.dur_ms for s in spans if s.stage == "compile")
    spans = [s for s in spans if s.step >= 0]
    if not spans:
        return [], {"window_ms": 0.0, "attention_ms": 0.0, "ffn_ms": 0.0, "overlap_ms": 0.0,
                    "overlap_efficiency": 0.0, "busy": {}, "steps": 0, "step_range": None, "overlap_steps": 0,
                    "micro_batches": 0, "compile_ms": compile_ms}
    window = max(s.end_ms for s in spans) - min(s.start_ms for s in spans)
    rows = []
    for rank in rank_order(spans):
        for stage in ("attention", "ffn", "send", "wait"):
            mine = [s for s in spans if s.rank == rank and s.stage == stage]
            if mine:
                total = sum(s.dur_ms for s in mine)
                rows.append([rank, stage, len(mine), round(total, 3), round(total / len(mine), 3),
                             round(100 * total / window, 1) if window else 0.0])
    steps = sorted({s.step for s in spans})
    prefills = len({s.step for s in spans if s.phase == "prefill"})
    m_of = {k: 1 + max(s.micro_batch for s in spans if s.step == k) for k in steps}
    paired = [k for k in steps if m_of[k] >= 2] or steps
    measured = [s for s in spans if s.step in paired]
    side = {role: _union([(s.start_ms, s.end_ms) for s in measured if s.stage == role]) for role in COMPUTE}
    overlap = _length(_intersection(side["attention"], side["ffn"]))
    shorter = min(_length(side["attention"]), _length(side["ffn"]))
    busy = {rank: (_length(_union([(s.start_ms, s.end_ms) for s in spans if s.rank == rank and s.stage in COMPUTE]))
                   / window if window else 0.0) for rank in rank_order(spans)}
    metrics = {"window_ms": window, "attention_ms": _length(side["attention"]), "ffn_ms": _length(side["ffn"]),
               "overlap_ms": overlap, "overlap_efficiency": overlap / shorter if shorter else 0.0, "busy": busy,
               "steps": len(steps), "step_range": (steps[0], steps[-1]), "overlap_steps": len(paired),
               "micro_batches": max(m_of[k] for k in paired), "compile_ms": compile_ms, "prefill_steps": prefills}
    return rows, metrics


def summary_markdown(metrics: dict, recorded_steps: int | None = None) -> str:
    """recorded_steps: how many the whole recording has (the valid step range is 0..that - 1)."""
    compiled = (f" Compiling new shapes took {metrics['compile_ms'] / 1e3:.1f} s, shown in red and left out of "
                "every figure here." if metrics.get("compile_ms") else "")
    valid = "" if recorded_steps is None else f" The recording has steps 0..{recorded_steps - 1}."
    if not metrics.get("steps"):
        return "No spans in the trace for these steps." + valid + compiled
    busy = ", ".join(f"{r} {100 * b:.0f}%" for r, b in metrics["busy"].items())
    first, last = metrics["step_range"]
    m = metrics["micro_batches"]
    if m >= 2:
        why = (f"measured on the {metrics['overlap_steps']} of these steps that ran with {m} micro-batches: while one "
               "micro-batch is in the FFN, the attention side computes the next")
    else:
        why = ("every step here ran with 1 micro-batch (a batch too small to split, or --micro-batches 1): the two "
               "sides then take turns, so 0% is expected; a batch of 2 or more rows with --micro-batches 2 overlaps")
    prefill = f", {metrics['prefill_steps']} of them prefill" if metrics.get("prefill_steps") else ""
    return (f"**Steps {first}..{last} ({metrics['steps']}{prefill}) in {metrics['window_ms']:.1f} ms.** Attention computes "
            f"{metrics['attention_ms']:.1f} ms, FFN {metrics['ffn_ms']:.1f} ms; both at once {metrics['overlap_ms']:.1f} ms: "
            f"**overlap efficiency {100 * metrics['overlap_efficiency']:.0f}%** (of the shorter side hidden behind "
            f"the other; {why}). Busy (compute / window): {busy}.{valid}{compiled}")


def figure(spans: list[Span], title: str = "AFD timeline"):
    """Interactive (plotly) gantt: one row per rank, a bar per span colored by stage, odd
    micro-batches hatched; hovering a bar names its rank, stage, layer, micro-batch and step."""
    import plotly.graph_objects as go

    ranks = rank_order(spans)
    fig = go.Figure()
    if not spans:
        fig.add_annotation(text="no spans", showarrow=False)
        return fig
    t0 = min(s.start_ms for s in spans)
    for stage, color in STAGE_COLORS.items():
        for odd in (False, True):
            sel = [s for s in spans if s.stage == stage and bool(s.micro_batch % 2) == odd]
            if not sel:
                continue
            fig.add_trace(go.Bar(
                orientation="h", y=[s.rank for s in sel], x=[s.dur_ms for s in sel],
                base=[s.start_ms - t0 for s in sel], name=f"{stage}{' (micro-batch 1, 3, …)' if odd else ''}",
                legendgroup=stage, marker={"color": color, "line": {"width": 0.3, "color": "black"},
                                           "pattern": {"shape": "/" if odd else ""}},
                hovertext=[(f"{s.rank} · compiling a new shape" if stage == "compile" else
                            f"{s.rank} · {stage} · layer {s.layer} · micro-batch {s.micro_batch} · step {s.step}")
                           + f"<br>{s.start_ms - t0:.3f} ms + {s.dur_ms:.3f} ms" for s in sel],
                hoverinfo="text"))
    # Each step labeled where it starts, with a line across every rank.
    for step in sorted({s.step for s in spans if s.step >= 0}):
        mine = [s for s in spans if s.step == step]
        x = min(s.start_ms for s in mine) - t0
        fig.add_vline(x=x, line={"width": 1, "dash": "dot", "color": "#888"})
        label = f"step {step}" + (" (prefill)" if mine[0].phase == "prefill" else "")
        fig.add_annotation(x=x, y=1.0, yref="paper", text=label, showarrow=False, xanchor="left",
                           yanchor="bottom", font={"size": 10})
    fig.update_layout(title=title, barmode="overlay", xaxis_title="ms", height=220 + 80 * len(ranks),
                      yaxis={"categoryorder": "array", "categoryarray": list(reversed(ranks))},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02},
                      margin={"l": 90, "r": 20, "t": 110, "b": 40})
    return fig
