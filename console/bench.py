"""Run `afd bench` scenarios as subprocesses and show their results.

A run is `python -m afd_compile.cli bench --scenario NAME ...` (an argument list), its output
streamed into the page; like the CLI it writes RUNS_DIR/NAME.json (serve, moe, afd: .png too),
outside the checkout. The tables are rebuilt from those JSON files, so results of earlier runs
show without running; a scenario never run here shows the committed benchmarks/results/ file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from afd_compile.roles.launcher import spawn
from afd_compile.roles.rank_spec import afd_argv
from benchmarks.monolithic import BACKENDS
from benchmarks.report import RESULTS_DIR, RUNS_DIR
from console import validate
from console.validate import ConsoleError

SCENARIOS = ("monolithic", "connector", "serve", "moe", "afd")
# The Bench tab's options each scenario takes (what bench_args sends for it).
OPTIONS = {"monolithic": ("batch_sizes", "steps", "repeats", "backends"), "connector": (),
           "serve": ("deployments", "rates", "requests"), "moe": ("repeats",), "afd": ("batch_sizes", "steps", "repeats")}


def bench_args(scenario: str, batch_sizes: str = "1,16,64", steps=32, repeats=3, backends: str = "compiled,eager",
               deployments: str = "monolithic,1A1F", rates: str = "1,2,4", requests=24,
               out: str | Path | None = None) -> list[str]:
    """`afd` arguments for one scenario, each value validated; only the scenario's own flags."""
    if scenario not in SCENARIOS:
        raise ConsoleError(f"Unknown scenario {scenario!r}: choose {', '.join(SCENARIOS)}.")
    args = ["bench", "--scenario", scenario]
    if scenario == "monolithic":
        args += ["--batch-sizes", validate.name_list(batch_sizes, "Batch sizes"),
                 "--steps", str(validate.integer(steps, "Steps", 2, 10_000)),
                 "--repeats", str(validate.integer(repeats, "Repeats", 1, 100)),
                 "--backends", validate.name_list(backends, "Backends", BACKENDS)]
    elif scenario == "afd":
        args += ["--batch-sizes", validate.name_list(batch_sizes, "Batch sizes"),
                 "--steps", str(validate.integer(steps, "Steps", 2, 10_000)),
                 "--repeats", str(validate.integer(repeats, "Repeats", 1, 100))]
    elif scenario == "moe":
        args += ["--repeats", str(validate.integer(repeats, "Repeats", 1, 100))]
    elif scenario == "serve":
        for d in validate.name_list(deployments, "Deployments").split(","):
            validate.afd_size(d)  # monolithic or xAyF
        args += ["--deployments", validate.name_list(deployments, "Deployments"),
                 "--rates", validate.name_list(rates, "Rates"),
                 "--requests", str(validate.integer(requests, "Requests", 1, 10_000))]
    if out is not None:
        args += ["--out", str(out)]
    return args


def results_path(scenario: str, results_dir: Path = RUNS_DIR) -> Path:
    """The scenario's latest run in results_dir, else the committed result."""
    path = Path(results_dir) / f"{scenario}.json"
    committed = RESULTS_DIR / f"{scenario}.json"
    return committed if not path.exists() and committed.exists() else path


def results_table(scenario: str, results_dir: Path = RUNS_DIR) -> tuple[list[str], list[list]]:
    """(headers, rows) of the scenario's result file, as `afd bench` prints them; empty if none."""
    path = results_path(scenario, results_dir)
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    res = data.get("results", {})
    if scenario == "monolithic":
        headers = ["batch", "backend", "tok/s", "ms/step", "median ms", "prefill ms", "warm-up s", "vs transformers"]
        rows = [[r["batch_size"], r["backend"], round(r["tokens_per_s"], 1), round(r["ms_per_step"], 3),
                 round(r["ms_per_step_median"], 3), round(r["prefill_ms"], 2), round(r["warmup_s"], 2),
                 "-" if r.get("speedup_vs_transformers") is None else f"{r['speedup_vs_transformers']:.2f}x"]
                for r in res]
        return headers, rows
    if scenario == "connector":
        sizes = sorted({int(n) for per in res.values() for n in per})
        headers = ["payload bytes", *(f"{k} µs" for k in res)]
        return headers, [[n, *(round(per[str(n)] * 1e6, 2) for per in res.values())] for n in sizes]
    if scenario == "serve":
        headers = ["deployment", "req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "errors"]
        rows = [[d, r["rate"], round(r["throughput_tok_s"], 1), round(r["ttft_p50"] * 1e3, 1),
                 round(r["ttft_p99"] * 1e3, 1), round((r["tpot_p50"] or 0) * 1e3, 1),
                 round((r["tpot_p99"] or 0) * 1e3, 1), r["errors"]] for d, rs in res.items() for r in rs]
        return headers, rows
    if scenario == "moe":
        names = [k[:-3] for k in res[0] if k.endswith("_us")] if res else []
        return ["tokens", *(f"{n} µs" for n in names)], [[r["tokens"], *(round(r[n + "_us"], 1) for n in names)]
                                                          for r in res]
    if scenario == "afd":
        ms = data["config"]["micro_batches"]
        headers = ["batch", "monolithic tok/s", *(f"1A1F m={m} tok/s" for m in ms), "best vs monolithic"]
        return headers, [[r["batch"], round(r["monolithic_tok_s"]), *(round(r[f"1A1F_m{m}_tok_s"]) for m in ms),
                          f"{r['afd_vs_monolithic']:.2f}x (m={r['best_m']})"] for r in res]
    return [], []


def results_info(scenario: str, results_dir: Path = RUNS_DIR) -> str:
    path = results_path(scenario, results_dir)
    if not path.exists():
        return f"No results yet for **{scenario}**: run it (`afd bench --scenario {scenario}`)."
    machine = json.loads(path.read_text()).get("machine", {})
    return (f"`{path}` — {machine.get('date', '?')}, {machine.get('cpus_usable', '?')} CPUs, torch "
            f"{machine.get('torch', '?')}, commit {str(machine.get('git_commit') or '?')[:10]}")


def results_image(scenario: str, results_dir: Path = RUNS_DIR, out_dir: Path | None = None) -> str | None:
    """The scenario's PNG: the one `afd bench` wrote (serve, moe, afd), else one drawn here from the JSON."""
    png = results_path(scenario, results_dir).with_suffix(".png")
    if png.exists():
        return str(png)
    path = results_path(scenario, results_dir)
    if not path.exists() or out_dir is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text()).get("results", {})
    fig, ax = plt.subplots(figsize=(8, 4))
    if scenario == "monolithic":
        for backend in dict.fromkeys(r["backend"] for r in res):
            pts = sorted((r["batch_size"], r["tokens_per_s"]) for r in res if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set(xscale="log", xlabel="decode batch size", ylabel="tokens/s", title="monolithic decode throughput")
    elif scenario == "connector":
        for name, per in res.items():
            pts = sorted((int(n), v * 1e6) for n, v in per.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="payload bytes", ylabel="round trip µs",
               title="connector round trip (median)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    target = Path(out_dir) / f"{scenario}.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return str(target)


class BenchRunner:
    """At most one `afd bench` subprocess at a time; its output streams into the page."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def run(self, args: list[str], poll_s: float = 0.5) -> Iterator[str]:
        """Starts the run and yields its output so far every poll_s; raises ConsoleError if it fails."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                raise ConsoleError("A benchmark is already running: wait for it or stop it.")
            self.lines = []
            self.proc = spawn(afd_argv(args), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            proc = self.proc
        pump = threading.Thread(target=lambda: self.lines.extend(line.rstrip("\n") for line in proc.stdout),
                                daemon=True)
        pump.start()
        while proc.poll() is None:
            yield "\n".join(self.lines)
            time.sleep(poll_s)
        pump.join(5)
        yield "\n".join(self.lines)
        if proc.returncode != 0:
            raise ConsoleError(f"`afd {' '.join(args)}` exited with code {proc.returncode}.")

    def stop(self) -> bool:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return False
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        return True
