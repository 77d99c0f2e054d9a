"""The console page: gr.Blocks with Launch, Chat, Traces and Bench tabs.

`Console` holds the server-side state (the launched deployment, the bench runner, a folder
for traces and plots) and one method per handler, so the handlers are plain functions tests
call without a browser. `build_app` lays the page out and wires the handlers; `main` serves it.
"""

from __future__ import annotations

import os
import shlex
import signal
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from afd_compile.config import CONNECTORS, DEFAULT_MODEL
from benchmarks.report import RESULTS_DIR, RUNS_DIR
from console import bench, chat, traces
from console.launcher import Launcher, LaunchSpec, commands
from console.validate import ConsoleError

STATUS_HEADERS = ["rank", "pid", "state", "uptime s", "endpoint"]
ALL_RANKS = "all ranks"
NOTICE_S = 10.0  # how long the Launch tab's status line shows an action's error
SUMMARY_HEADERS = ["rank", "stage", "spans", "total ms", "mean ms", "% of window"]


def _frame(rows: list[list], headers: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=headers)


class Console:
    def __init__(self, artifacts_dir: str | Path | None = None, results_dir: str | Path = RUNS_DIR,
                 launcher: Launcher | None = None):
        self.artifacts = Path(artifacts_dir or tempfile.mkdtemp(prefix="afd-console-"))
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.results_dir = Path(results_dir)
        self.launcher = launcher or Launcher()
        self.bench = bench.BenchRunner()
        # The Launch tab's one status line: the last action's error for NOTICE_S (or until the
        # next action), else the deployment's state (rewritten every tick, never appended to).
        self._notice: tuple[str, float] | None = None

    # ---- Launch tab
    def launch(self, model, afd_size, micro_batches, connector, enforce_eager, warmup, host, port):
        """-> (status line, status table, commands, chat server URL, log choices)"""
        try:
            spec = LaunchSpec.from_form(model, afd_size, micro_batches, connector, enforce_eager, warmup, host, port)
            self.launcher.start(spec)
        except ConsoleError as e:
            self._notice = f"⚠️ {e}", time.monotonic()
            return self._notice[0], self.status_table(), gr.skip(), gr.skip(), gr.skip()
        self._notice = None
        names = [ALL_RANKS, *(r.name for r in self.launcher.ranks)]
        return (self.launcher.summary(), self.status_table(), commands(spec, self.launcher.master_port), spec.url(),
                gr.update(choices=names, value=ALL_RANKS))

    def stop(self):
        """-> (status line, status table)"""
        self._notice = None
        if not self.launcher.ranks:
            return "Nothing to stop.", self.status_table()
        self.launcher.stop()
        return self.launcher.summary(), self.status_table()

    def status_table(self) -> pd.DataFrame:
        return _frame(self.launcher.status_rows(), STATUS_HEADERS)

    def tick(self, log_rank: str | None = None):
        """-> (status table, status line, logs of log_rank or of every rank), every second."""
        notice = self._notice is not None and time.monotonic() - self._notice[1] < NOTICE_S
        return (self.status_table(), self._notice[0] if notice else self.launcher.summary(),
                self.launcher.logs(None if log_rank in (None, ALL_RANKS) else log_rank))

    # ---- Traces tab
    def record(self, model, afd_size, micro_batches, connector, enforce_eager, warmup, host, port, steps):
        """Generator -> (message, figure, summary markdown, summary table, trace file, trace path)"""
        try:
            spec = LaunchSpec.from_form(model, afd_size, micro_batches, connector, enforce_eager, warmup, host, port)
            from console import validate

            steps = validate.integer(steps, "Decode steps", 1, 256)
            args = traces.record_args(spec, steps, "TRACE.json")
        except ConsoleError as e:
            yield f"⚠️ {e}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        path = self.artifacts / f"trace-{spec.name}-{time.strftime('%H%M%S')}.json"
        running = self.launcher.spec if self.launcher.running else None
        if running is not None and running.topology is not None and all(
                self.launcher.state(r) == "ready" for r in self.launcher.ranks):
            yield (f"Recording the next {steps} steps of the running {running.name} deployment "
                   "(`POST /debug/trace`, with a few chat requests to drive it)…",
                   gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
            try:
                traces.record_live(running.url(), steps, path)
            except ConsoleError as e:
                yield f"⚠️ {e}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            fig, md, table = self.show_trace(str(path))
            yield f"Recorded `{path}` from the running deployment.", fig, md, table, str(path), str(path)
            return
        shown = shlex.join(["afd", *args[:args.index("--")]]).replace("TRACE.json", path.name)
        yield (f"Recording {steps} decode steps with a separate short run: `{shown} -- PROMPTS…`",
               gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        try:
            traces.record(spec, steps, path)
        except ConsoleError as e:
            yield f"⚠️ {e}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        fig, md, table = self.show_trace(str(path))
        yield f"Recorded `{path}`.", fig, md, table, str(path), str(path)

    def show_trace(self, path: str | None, first_step=None, last_step=None):
        """-> (figure, summary markdown, summary table) for steps first..last (blank: all)."""
        if not path:
            return None, "Record a trace first.", _frame([], SUMMARY_HEADERS)
        spans = traces.load_spans(path)
        recorded = traces.step_count(spans)
        first = None if first_step in (None, "") or first_step < 0 else int(first_step)
        last = None if last_step in (None, "") or last_step < 0 else int(last_step)
        spans = traces.select_steps(spans, first, last)
        rows, metrics = traces.summary(spans)
        shown = "all steps" if first is None and last is None else \
            f"steps {first if first is not None else 0}..{last if last is not None else recorded - 1}"
        title = f"{Path(path).name}: {shown} of 0..{recorded - 1}"
        return (traces.figure(spans, title), traces.summary_markdown(metrics, recorded),
                _frame(rows, SUMMARY_HEADERS))

    # ---- Bench tab
    def bench_results(self, scenario):
        """-> (info markdown, table, image)"""
        headers, rows = bench.results_table(scenario, self.results_dir)
        image = bench.results_image(scenario, self.results_dir, self.artifacts / "bench")
        return bench.results_info(scenario, self.results_dir), _frame(rows, headers or ["-"]), image

    def run_bench(self, scenario, batch_sizes, steps, repeats, backends, deployments, rates, requests):
        """Generator -> (log, info markdown, table, image)"""
        try:
            args = bench.bench_args(scenario, batch_sizes, steps, repeats, backends, deployments, rates, requests,
                                    out=self.results_dir / f"{scenario}.json")
        except ConsoleError as e:
            yield f"⚠️ {e}", gr.skip(), gr.skip(), gr.skip()
            return
        header = f"$ afd {' '.join(args)}\n"
        log = header
        try:
            for log in self.bench.run(args):
                yield header + log, gr.skip(), gr.skip(), gr.skip()
        except ConsoleError as e:
            yield f"{header}{log}\n⚠️ {e}", gr.skip(), gr.skip(), gr.skip()
            return
        yield (header + log, *self.bench_results(scenario))

    def stop_bench(self) -> str:
        return "Stopped the benchmark." if self.bench.stop() else "No benchmark is running."


def build_app(console: Console | None = None) -> gr.Blocks:
    c = console or Console()
    with gr.Blocks(title="afd console") as demo:
        gr.Markdown("# afd console\nAttention–FFN disaggregated MoE inference: launch, chat, trace, benchmark.")
        with gr.Tabs():
            with gr.Tab("Launch", id="launch", elem_id="tab-launch"):
                with gr.Row():
                    model = gr.Textbox(str(DEFAULT_MODEL), label="Model directory", scale=3, elem_id="model")
                    afd_size = gr.Textbox("1A1F", label="AFD size (xAyF, or monolithic)", elem_id="afd-size")
                    micro_batches = gr.Number(2, precision=0, label="Micro-batches", elem_id="micro-batches")
                with gr.Row():
                    connector = gr.Dropdown(list(CONNECTORS), value="shm", label="Connector", elem_id="connector")
                    host = gr.Textbox("127.0.0.1", label="Host", elem_id="host")
                    port = gr.Number(8000, precision=0, label="Port (attention rank i: port + i)", elem_id="port")
                    enforce_eager = gr.Checkbox(False, label="--enforce-eager (no torch.compile: starts faster)",
                                                elem_id="enforce-eager")
                    warmup = gr.Checkbox(True, label="warm-up (compile every decode shape before serving: no "
                                         "compile stalls in chats; off: --no-warmup)", elem_id="warmup")
                with gr.Row():
                    launch_btn = gr.Button("Launch", variant="primary", elem_id="launch-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                state_md = gr.Markdown("No deployment started.", elem_id="deployment-state")
                status = gr.Dataframe(_frame([], STATUS_HEADERS), label="Ranks", interactive=False,
                                      elem_id="rank-status")
                cmds = gr.Code("", language="shell", label="Equivalent CLI commands (copy to other machines)",
                               elem_id="commands")
                log_rank = gr.Radio([ALL_RANKS], value=ALL_RANKS, label="Logs of", elem_id="log-rank")
                logs = gr.Textbox(label="Logs (newest last)", lines=14, max_lines=14, autoscroll=True, elem_id="logs")

            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                with gr.Row():
                    url = gr.Textbox("http://127.0.0.1:8000", label="Server URL", scale=3, elem_id="server-url")
                    api_key = gr.Textbox("", label="API key (if the server needs one)", type="password")
                chatbot = gr.Chatbot(label="Chat", height=320, elem_id="chatbot")
                stats = gr.Markdown(elem_id="chat-stats")
                with gr.Row():
                    msg = gr.Textbox(placeholder="1 3 5 7 9", label="Message", scale=4, elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    clear = gr.Button("Clear")
                with gr.Accordion("Sampling", open=False):
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, 0.0, step=0.05, label="temperature (0: greedy)")
                        top_p = gr.Slider(0.01, 1.0, 1.0, step=0.01, label="top_p")
                        top_k = gr.Number(-1, precision=0, label="top_k (-1: off)")
                        repetition_penalty = gr.Slider(0.5, 2.0, 1.0, step=0.05, label="repetition_penalty")
                        max_tokens = gr.Number(32, precision=0, label="max_tokens")
                    multi_turn = gr.Checkbox(False, label="send earlier turns (the demo model is trained on single turns)")

            with gr.Tab("Traces", id="traces", elem_id="tab-traces"):
                gr.Markdown("Records the next N steps of the running AFD deployment (`POST /debug/trace`), or, "
                            "with none running, of a short separate run with the Launch tab's settings "
                            "(`afd generate --trace`); then shows every rank on one timeline.")
                with gr.Row():
                    steps = gr.Number(4, precision=0, label="Decode steps to record", elem_id="trace-steps")
                    record_btn = gr.Button("Record", variant="primary", elem_id="record-btn")
                    first_step = gr.Number(-1, precision=0, label="show from step (0..N-1 of the recording; -1: first)",
                                           elem_id="first-step")
                    last_step = gr.Number(-1, precision=0, label="to step (-1: last)", elem_id="last-step")
                    redraw = gr.Button("Redraw")
                trace_msg = gr.Markdown(elem_id="trace-message")
                plot = gr.Plot(label="Timeline", elem_id="timeline")
                trace_md = gr.Markdown(elem_id="trace-summary")
                trace_table = gr.Dataframe(_frame([], SUMMARY_HEADERS), label="Time per stage", interactive=False,
                                           elem_id="trace-table")
                download = gr.DownloadButton("Download Chrome trace JSON", elem_id="trace-download")
                trace_path = gr.State(None)

            with gr.Tab("Bench", id="bench", elem_id="tab-bench"):
                with gr.Row():
                    scenario = gr.Radio(list(bench.SCENARIOS), value="serve", label="Scenario", elem_id="scenario")
                    run_btn = gr.Button("Run", variant="primary", elem_id="bench-run")
                    stop_bench = gr.Button("Stop", variant="stop")
                with gr.Accordion("Options", open=False):
                    # Only the picked scenario's own flags show (bench.bench_args sends only those).
                    shown = bench.OPTIONS["serve"]
                    with gr.Row():
                        batch_sizes = gr.Textbox("1,16,64", label="batch sizes", visible="batch_sizes" in shown,
                                                 elem_id="bench-batch-sizes")
                        bsteps = gr.Number(32, precision=0, label="steps", visible="steps" in shown)
                        repeats = gr.Number(3, precision=0, label="repeats", visible="repeats" in shown)
                        backends = gr.Textbox("compiled,eager,transformers", label="backends",
                                              visible="backends" in shown)
                        deployments = gr.Textbox("monolithic,1A1F,2A2F", label="deployments",
                                                 visible="deployments" in shown, elem_id="bench-deployments")
                        rates = gr.Textbox("1,2,4", label="rates (req/s)", visible="rates" in shown)
                        requests = gr.Number(24, precision=0, label="requests per rate", visible="requests" in shown)
                    no_options = gr.Markdown("This scenario has no options.", visible=not shown)
                bench_info = gr.Markdown(elem_id="bench-info")
                bench_table = gr.Dataframe(label="Results", interactive=False, elem_id="bench-table")
                bench_image = gr.Image(label="Plot", type="filepath", elem_id="bench-plot")
                bench_log = gr.Textbox(label="Output", lines=10, max_lines=10, autoscroll=True, elem_id="bench-log")

        form = [model, afd_size, micro_batches, connector, enforce_eager, warmup, host, port]
        launch_btn.click(c.launch, form, [state_md, status, cmds, url, log_rank])
        stop_btn.click(c.stop, None, [state_md, status])
        gr.Timer(1.0).tick(c.tick, log_rank, [status, state_md, logs], show_progress="hidden")
        log_rank.change(c.tick, log_rank, [status, state_md, logs], show_progress="hidden")

        chat_inputs = [msg, chatbot, url, api_key, multi_turn, temperature, top_p, top_k, repetition_penalty, max_tokens]
        send.click(chat.respond, chat_inputs, [chatbot, stats, msg])
        msg.submit(chat.respond, chat_inputs, [chatbot, stats, msg])
        clear.click(lambda: ([], ""), None, [chatbot, stats])

        record_btn.click(c.record, [*form, steps], [trace_msg, plot, trace_md, trace_table, download, trace_path])
        redraw.click(c.show_trace, [trace_path, first_step, last_step], [plot, trace_md, trace_table])

        scenario.change(c.bench_results, scenario, [bench_info, bench_table, bench_image])
        options = {"batch_sizes": batch_sizes, "steps": bsteps, "repeats": repeats, "backends": backends,
                   "deployments": deployments, "rates": rates, "requests": requests}
        scenario.change(lambda s: [gr.update(visible=name in bench.OPTIONS[s]) for name in options]
                        + [gr.update(visible=not bench.OPTIONS[s])], scenario, [*options.values(), no_options])
        run_btn.click(c.run_bench, [scenario, batch_sizes, bsteps, repeats, backends, deployments, rates, requests],
                      [bench_log, bench_info, bench_table, bench_image])
        stop_bench.click(c.stop_bench, None, bench_log)
        demo.load(c.bench_results, scenario, [bench_info, bench_table, bench_image])
    # Gradio's queue (made by Blocks itself) polls for events every 1 ms when it has none, and
    # for progress every 10 ms: 6-7% of a core on this 2-core machine with no browser open.
    # Every 50 ms (250 ms) instead: an event starts at most 50 ms later. No public option sets
    # these (gradio 6.31).
    demo._queue.sleep_when_free, demo._queue.progress_update_sleep_when_free = 0.05, 0.25
    demo.console = c
    return demo


def main(host: str = "127.0.0.1", port: int = 7860) -> None:
    c = Console()
    demo = build_app(c)
    print(f"afd console on http://{host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM closes the page and stops the ranks, as Ctrl-C does
    try:
        demo.launch(server_name=host, server_port=port, allowed_paths=[str(c.artifacts), str(c.results_dir), str(RESULTS_DIR)],
                            show_error=True, quiet=True)
    finally:
        c.launcher.stop()
        c.bench.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
