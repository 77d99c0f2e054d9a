"""The web console's handlers, without a browser: input validation, command lines, rank states,
chat against no server and against a real 1A1F deployment, trace summaries, bench commands."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from afd_compile.cli import build_parser
from afd_compile.roles.rendezvous import free_port
from console import bench, chat, traces, validate
from console.app import Console, build_app
from afd_compile.roles.launcher import Supervisor
from console.launcher import Launcher, LaunchSpec, commands
from console.validate import ConsoleError
from tests.conftest import SHIPPED_MODEL

FORM = dict(model=str(SHIPPED_MODEL), afd_size="2A2F", micro_batches=2, connector="shm", enforce_eager=True,
            warmup=False, host="127.0.0.1", port=8100)


def form(**changes):
    return {**FORM, **changes}


# ---- validation: every refusal is a sentence naming the field

@pytest.mark.parametrize("changes, message", [
    (dict(model=""), "Model directory is empty"),
    (dict(model="/no/such/dir"), "does not exist"),
    (dict(afd_size="2X2F"), "malformed afd_size '2X2F'"),
    (dict(afd_size="0A1F"), "at least one attention"),
    (dict(micro_batches=2.5), "Micro-batches must be a whole number"),
    (dict(micro_batches=0), "Micro-batches must be between 1 and 16"),
    (dict(connector="tcp"), "Connector must be one of gloo, shm, nccl"),
    (dict(host="my host; rm -rf /"), "Host must be an IP address"),
    (dict(port=80), "Port must be between 1024 and"),
    (dict(port="http"), "Port must be a whole number"),
    (dict(port=65535), "Port must be between 1024 and 65534"),  # 2A2F: attention rank 1 serves port + 1
])
def test_launch_form_validation(changes, message):
    with pytest.raises(ConsoleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LaunchSpec.from_form(**form(**changes))


def test_model_dir_needs_config_json(tmp_path):
    with pytest.raises(ConsoleError, match="has no config.json"):
        validate.model_dir(tmp_path)


def test_console_launch_shows_validation_error_and_starts_nothing(tmp_path):
    c = Console(artifacts_dir=tmp_path)
    message, table, *_ = c.launch(*form(model=str(tmp_path / "missing")).values())
    assert message.startswith("⚠️") and "does not exist" in message
    assert c.launcher.ranks == [] and table.empty
    assert c.tick()[1] == message  # the status line keeps the error a while, then shows the state again


# ---- command lines: argument lists, and the text to copy

def test_rank_commands_are_argument_lists():
    spec = LaunchSpec.from_form(**form())
    ranks = spec.rank_specs()
    assert [r.name for r in ranks] == ["ffn 0", "ffn 1", "attention 0", "attention 1"]
    for rank in ranks:
        args = rank.args()
        assert isinstance(args, list) and all(isinstance(a, str) for a in args)
        assert args[args.index("--afd-size") + 1] == "2A2F" and "--enforce-eager" in args
        assert args[args.index("--rank") + 1] == rank.name.split()[1]
        assert rank.argv()[-len(args):] == args and rank.argv()[1:3] == ["-m", "afd_compile.cli"]
    assert ranks[0].args()[0] == "ffn" and ranks[2].args()[0] == "serve"
    assert ranks[2].args()[-4:] == ["--host", "127.0.0.1", "--port", "8100"]
    assert spec.url(1) == "http://127.0.0.1:8101"
    mono = LaunchSpec.from_form(**form(afd_size="monolithic"))
    assert [(r.name, r.args()) for r in mono.rank_specs()] == [
        ("server", ["serve", "--model", str(SHIPPED_MODEL), "--enforce-eager", "--host", "127.0.0.1", "--port", "8100"])]
    # warm-up is the default; --no-warmup is the servers' (attention ranks', or afd launch's) flag,
    # not the FFN ranks'
    cold = LaunchSpec.from_form(**form(enforce_eager=False, warmup=False))
    assert ["--no-warmup" in r.args() for r in cold.rank_specs()] == [False, False, True, True]
    assert "--no-warmup" in cold.launch_args() and "--no-warmup" not in LaunchSpec.from_form(
        **form(afd_size="monolithic", warmup=True)).launch_args()


def test_commands_text_quotes_paths(tmp_path):
    model = tmp_path / "my model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = LaunchSpec.from_form(**form(model=str(model), afd_size="1A1F"))
    text = commands(spec, master_port=29555)
    assert f"afd launch --afd-size 1A1F --model '{model}' --micro-batches 2 --connector shm" in text
    assert "export MASTER_ADDR=127.0.0.1 MASTER_PORT=29555" in text
    # one rank per machine: shm joins ranks of one host only, so these use gloo
    assert f"afd ffn --afd-size 1A1F --model '{model}' --micro-batches 2 --connector gloo --enforce-eager --rank 0" \
        in text
    assert text.count("--connector shm") == 1
    assert "afd serve" in text and "--rank 0 --host 127.0.0.1 --port 8100" in text


def test_cli_has_console_subcommand():
    args = build_parser().parse_args(["console"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert build_parser().parse_args(["console", "--port", "9000"]).port == 9000


def test_app_builds(tmp_path):
    demo = build_app(Console(artifacts_dir=tmp_path))
    assert demo.console.artifacts == tmp_path


# ---- rank states: starting -> ready -> stopped, and failed

class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def fake_launcher(**scripts) -> Launcher:
    """A 1A1F Launcher whose ranks are stand-in Python scripts instead of `afd`."""
    launcher = Launcher()
    launcher.spec = LaunchSpec.from_form(**form(afd_size="1A1F"))
    launcher.supervisor = Supervisor({}, relay_logs=False)
    for name, script in scripts.items():
        launcher.supervisor.start(name.replace("_", " "), [sys.executable, "-c", script])
    return launcher


def test_rank_state_transitions(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    launcher = fake_launcher(ffn_0="import time; time.sleep(60)",
                             attention_0="import time; print('up', flush=True); time.sleep(60)")
    attention = launcher.ranks[1]
    launcher.urls["attention 0"] = f"http://127.0.0.1:{free_port()}"  # nothing listens yet
    try:
        rows = launcher.status_rows()
        assert [r[2] for r in rows] == ["starting", "starting"]
        assert all(isinstance(r[1], int) and r[3] >= 0 for r in rows)
        assert "starting (0/2 ranks ready)" in launcher.summary()
        launcher.urls["attention 0"] = url  # its /health answers now
        assert [r[2] for r in launcher.status_rows()] == ["ready", "ready"]  # FFN ready once attention is
        assert "1A1F ready" in launcher.summary()
        deadline = time.monotonic() + 5
        while "up" not in list(attention.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "up" in launcher.logs()
        launcher.stop()
        assert [r[2] for r in launcher.status_rows()] == ["stopped", "stopped"]
        assert launcher.summary() == "1A1F stopped."
        uptime = launcher.status_rows()[0][3]
        time.sleep(0.3)
        assert launcher.status_rows()[0][3] == uptime  # the clock stops with the rank
    finally:
        launcher.stop()
        server.shutdown()


def test_rank_failure_is_reported(tmp_path):
    launcher = fake_launcher(ffn_0="import sys; print('afd: error: boom', flush=True); sys.exit(3)")
    bad = launcher.ranks[0]
    bad.proc.wait(10)
    time.sleep(0.2)  # the log pump
    assert launcher.status_rows()[0][2] == "failed"
    assert "ffn 0 failed** (exit code 3): afd: error: boom" in launcher.summary()


# ---- chat

def test_chat_without_server_says_so():
    url = f"http://127.0.0.1:{free_port()}"
    *_, (history, stats, box) = chat.respond("1 3 5 7 9", [], url, "", False, 0.0, 1.0, -1, 1.0, 16)
    assert history[0] == {"role": "user", "content": "1 3 5 7 9"}
    assert f"No server is running at {url}" in history[-1]["content"]
    assert "No server is running" in stats and box == ""


@pytest.mark.parametrize("args, message", [
    ((0.0, 0.0, -1, 1.0, 16), "top_p must be in (0.0, 1.0]"),
    ((-1.0, 1.0, -1, 1.0, 16), "Temperature must be in [0.0, 2.0]"),
    ((0.0, 1.0, 0, 1.0, 16), "top_k must be -1 (off) or at least 1"),
    ((0.0, 1.0, -1, 1.0, 0), "Max tokens must be between 1 and 4096"),
])
def test_chat_rejects_bad_sampling(args, message):
    *_, (history, stats, box) = chat.respond("hi", [], "http://127.0.0.1:1", "", False, *args)
    assert message in stats and history == [] and box == "hi"


def test_answer_stats():
    s = chat.AnswerStats(tokens=9, ttft_s=0.1, total_s=0.5)
    assert s.tokens_per_s == pytest.approx(20.0)
    assert "time to first token 100 ms" in s.markdown() and "20.0 tok/s" in s.markdown()
    assert chat.AnswerStats(tokens=1, ttft_s=0.1, total_s=0.1).tokens_per_s is None


def test_launch_chat_stop_1a1f(tmp_path):
    """A real 1A1F deployment from the Launch handler: starting -> ready, a streamed answer with
    its timing, each rank's log at INFO, then stopped with INFO lines only."""
    c = Console(artifacts_dir=tmp_path)
    port = free_port()
    message, table, cmds, url, _ = c.launch(*form(afd_size="1A1F", port=port).values())
    try:
        assert message.startswith("1A1F starting"), message
        assert url == f"http://127.0.0.1:{port}" and "afd ffn" in cmds
        assert set(table["state"]) <= {"starting", "ready"}
        again, *_ = c.launch(*form(afd_size="1A1F", port=port).values())
        assert "already running" in again
        assert c.launcher.wait_ready(120), c.launcher.logs()
        assert list(c.status_table()["state"]) == ["ready", "ready"]
        *_, (history, stats, _) = chat.respond("1 3 5 7 9", [], url, "", False, 0.0, 1.0, -1, 1.0, 32)
        assert history[-1]["content"].startswith("11 13 15 17 19"), history
        assert "time to first token" in stats and "tok/s" in stats
        _, _, logs = c.tick("attention 0")
        assert c.launcher.summary() == "**1A1F ready**: API at " + url + "/v1"
        assert "POST /v1/chat/completions" in logs and "-----" not in logs  # the access line, one rank's log
        assert "ffn rank 0 ready" in c.tick("ffn 0")[2]
    finally:
        c.stop()
    assert list(c.status_table()["state"]) == ["stopped", "stopped"]
    for rank in c.launcher.ranks:  # a planned stop reads as one
        log = "\n".join(rank.log)
        assert " ERROR " not in log and "Traceback" not in log and "re-forming" not in log, log


# ---- traces

def _synthetic_trace() -> dict:
    """attention computes [0,10) and [20,30) ms, FFN [5,15) and [30,40) ms: they overlap in [5,10).
    Engine steps 41 and 42 (numbered 0 and 1 in the recording), each with 2 micro-batches, and a
    compile span before them."""
    def ev(pid, name, start_ms, dur_ms, layer, mb, step=41):
        return {"name": name, "cat": "x", "ph": "X", "pid": pid, "tid": 0, "ts": 1e9 + start_ms * 1e3,
                "dur": dur_ms * 1e3, "args": {"layer": layer, "micro_batch": mb, "step": step}}

    return {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "ffn 0"}},
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "attention 0"}},
        {"name": "compile", "cat": "compile", "ph": "X", "pid": 0, "tid": 0, "ts": 1e9 - 5e6, "dur": 4e6,
         "args": {"shape": "attention decode step"}},
        ev(0, "attention", 0, 10, 0, 0), ev(0, "send", 10, 1, 0, 1), ev(0, "wait", 11, 9, 0, 0),
        ev(0, "attention", 20, 10, 1, 1, step=42),
        ev(1, "wait", 0, 5, 0, 0), ev(1, "ffn", 5, 10, 0, 0), ev(1, "send", 15, 2, 0, 0),
        ev(1, "ffn", 30, 10, 1, 1, step=42),
    ], "displayTimeUnit": "ms"}


class _BusyServer(BaseHTTPRequestHandler):
    """A deployment whose /debug/trace, as the real one, records only while a request runs and
    is answered late (a loaded machine): chat requests stream one token a millisecond."""
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes
    active = 0
    lock = threading.Lock()

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply(200, {"data": [{"id": "m", "max_model_len": 512}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/debug/trace":
            time.sleep(0.3)
            with self.lock:
                running = self.active > 0
            self._reply(200, _synthetic_trace()) if running else self._reply(409, {"error": "nothing runs"})
            return
        self.send_response(200)
        self.end_headers()
        with self.lock:
            type(self).active += 1
        try:
            for _ in range(body["max_tokens"]):
                self.wfile.write(b'data: {"choices": []}\n\n')
                self.wfile.flush()
                time.sleep(0.001)
        except OSError:  # the client closed the stream: the request is aborted
            pass
        finally:
            with self.lock:
                type(self).active -= 1

    def log_message(self, *args):
        pass


def test_record_live_keeps_requests_running_until_the_trace_is_taken(tmp_path):
    """The trace request reaches the server after short requests would have ended: the driving
    requests go on until the recording is done (a 409 from a finished load failed CI once)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BusyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = traces.record_live(f"http://127.0.0.1:{server.server_address[1]}", 3, tmp_path / "t.json",
                                  timeout_s=10)
        assert traces.step_count(traces.load_spans(path)) == 2
        deadline = time.monotonic() + 5
        while _BusyServer.active:  # every driving request was closed
            assert time.monotonic() < deadline, _BusyServer.active
            time.sleep(0.05)
    finally:
        server.shutdown()


def test_trace_summary_numbers(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_synthetic_trace()))
    spans = traces.load_spans(path)
    assert traces.rank_order(spans) == ["attention 0", "ffn 0"]
    assert spans[0].start_ms == 0.0 and spans[0].stage == "compile" and spans[0].step == -1
    assert traces.step_count(spans) == 2 and {s.step for s in spans} == {-1, 0, 1}
    rows, m = traces.summary(spans)
    assert m["compile_ms"] == pytest.approx(4000.0)  # apart: not in the window, not attention
    assert m["window_ms"] == pytest.approx(40.0)
    assert m["attention_ms"] == pytest.approx(20.0) and m["ffn_ms"] == pytest.approx(20.0)
    assert m["overlap_ms"] == pytest.approx(5.0)
    assert m["overlap_efficiency"] == pytest.approx(0.25)
    assert m["busy"] == {"attention 0": pytest.approx(0.5), "ffn 0": pytest.approx(0.5)}
    assert m["steps"] == 2 and m["step_range"] == (0, 1) and m["micro_batches"] == 2
    by = {(r[0], r[1]): r for r in rows}
    assert by["attention 0", "attention"][2:] == [2, 20.0, 10.0, 50.0]
    assert by["attention 0", "wait"][2:] == [1, 9.0, 9.0, 22.5]
    assert by["ffn 0", "send"][2:] == [1, 2.0, 2.0, 5.0]
    md = traces.summary_markdown(m, 2)
    assert "overlap efficiency 25%" in md and "2 micro-batches" in md and "steps 0..1" in md
    assert "4.0 s" in md  # the compile, named apart
    # one step only
    _, m1 = traces.summary(traces.select_steps(spans, 1, 1))
    assert m1["steps"] == 1 and m1["overlap_ms"] == 0.0 and m1["window_ms"] == pytest.approx(20.0)
    assert "The recording has steps 0..1" in traces.summary_markdown(traces.summary(traces.select_steps(spans, 5, 6))[1], 2)
    # one micro-batch: the two sides take turns, and the summary says why there is no overlap
    single = [replace(s, micro_batch=0) for s in spans]
    assert "1 micro-batch" in traces.summary_markdown(traces.summary(single)[1], 2)
    # a mix: overlap measured on the steps with 2 micro-batches only
    mixed = [replace(s, micro_batch=0) if s.step == 0 else s for s in spans]
    assert traces.summary(mixed)[1]["overlap_steps"] == 1
    fig = traces.figure(spans)
    assert list(fig.layout.yaxis.categoryarray) == ["ffn 0", "attention 0"]  # attention drawn on top
    assert sum(len(bar.x) for bar in fig.data) == len(spans)
    assert [a.text for a in fig.layout.annotations] == ["step 0", "step 1"]
    assert {bar.legendgroup for bar in fig.data} == {s.stage for s in spans}
    # through the Traces tab's handler
    c = Console(artifacts_dir=tmp_path)
    fig, md, table = c.show_trace(str(path), -1, -1)
    assert "overlap efficiency 25%" in md and len(table) == len(rows)


def test_record_args():
    spec = LaunchSpec.from_form(**form(afd_size="1A1F"))
    args = traces.record_args(spec, 4, "/tmp/x.json")
    assert args[0] == "generate" and args[args.index("--trace") + 1] == "/tmp/x.json"
    assert args[args.index("--max-tokens") + 1] == "5" and "--chat" in args
    assert len(args) - args.index("--") - 1 == 4  # 2 prompts per micro-batch
    with pytest.raises(ConsoleError, match="set an AFD size"):
        traces.record_args(LaunchSpec.from_form(**form(afd_size="monolithic")), 4, "/tmp/x.json")


# ---- bench

def test_bench_args_and_results(tmp_path, monkeypatch):
    assert bench.bench_args("connector") == ["bench", "--scenario", "connector"]
    args = bench.bench_args("monolithic", "1, 16", 8, 1, "eager", out=tmp_path / "m.json")
    assert args == ["bench", "--scenario", "monolithic", "--batch-sizes", "1,16", "--steps", "8", "--repeats", "1",
                    "--backends", "eager", "--out", str(tmp_path / "m.json")]
    assert bench.bench_args("moe", repeats=5) == ["bench", "--scenario", "moe", "--repeats", "5"]
    assert bench.bench_args("afd", "8,32", 16, 2) == ["bench", "--scenario", "afd", "--batch-sizes", "8,32",
                                                      "--steps", "16", "--repeats", "2"]
    with pytest.raises(ConsoleError, match="Backends: unknown vllm"):
        bench.bench_args("monolithic", backends="eager,vllm")
    with pytest.raises(ConsoleError, match="malformed afd_size"):
        bench.bench_args("serve", deployments="monolithic,2B2F")
    with pytest.raises(ConsoleError, match="Batch sizes must be a comma-separated list"):
        bench.bench_args("monolithic", batch_sizes="1;rm")
    for scenario in bench.SCENARIOS:  # the committed results render
        headers, rows = bench.results_table(scenario)
        if bench.results_path(scenario).exists():
            assert headers and rows and all(len(r) == len(headers) for r in rows)
            assert bench.results_image(scenario, out_dir=tmp_path)
    # A scenario not run here shows the committed result; once run, the run's own file.
    assert bench.results_path("serve", tmp_path) == bench.RESULTS_DIR / "serve.json"
    (tmp_path / "serve.json").write_text(json.dumps({"results": {}}))
    assert bench.results_path("serve", tmp_path) == tmp_path / "serve.json"
    assert bench.results_table("serve", tmp_path)[1] == []
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path / "committed")
    assert bench.results_table("moe", tmp_path) == ([], [])
    assert "No results yet" in bench.results_info("moe", tmp_path)


def test_bench_run_from_console(tmp_path):
    """The Bench tab's Run: `afd bench --scenario connector` as a subprocess, its output streamed,
    then its table rebuilt from the JSON it wrote (into the console's results folder)."""
    c = Console(artifacts_dir=tmp_path / "artifacts", results_dir=tmp_path / "results")
    outputs = list(c.run_bench("connector", "1", 2, 1, "eager", "monolithic", "1", 1))
    assert outputs[0][0].startswith("$ afd bench --scenario connector --out ")
    log, info, table, image = outputs[-1]
    assert "wrote" in log and "connector.json" in info
    assert list(table.columns)[:2] == ["payload bytes", "tcp (raw socket) µs"] and len(table) > 3
    assert image and image.endswith("connector.png")
    bad = list(c.run_bench("monolithic", "1", 2, 1, "vllm", "monolithic", "1", 1))
    assert bad[-1][0].startswith("⚠️ Backends: unknown vllm")
    assert c.stop_bench() == "No benchmark is running."


def test_server_mounts_console_at_console_path(shipped_model, tmp_path):
    """`afd serve --console`: the API and the Gradio page from one server."""
    import httpx

    from tests.server_fixtures import start_monolithic

    server = start_monolithic(shipped_model, tmp_path, extra=["--console"])
    try:
        server.wait_ready(120)
        page = httpx.get(f"{server.url}/console/", timeout=30, follow_redirects=True)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200
    finally:
        server.stop()


def test_bench_tab_shows_each_scenarios_own_options():
    """The Bench tab shows a scenario's options only: exactly the flags bench_args sends for it."""
    flag = {"batch_sizes": "--batch-sizes", "steps": "--steps", "repeats": "--repeats", "backends": "--backends",
            "deployments": "--deployments", "rates": "--rates", "requests": "--requests"}
    assert set(bench.OPTIONS) == set(bench.SCENARIOS)
    for scenario in bench.SCENARIOS:
        args = bench.bench_args(scenario)
        assert {f for f in flag.values() if f in args} == {flag[o] for o in bench.OPTIONS[scenario]}, scenario


class _CompilingServer(BaseHTTPRequestHandler):
    """A chat stream of 4 chunks that stalls 1.6 s after the second while a shape compiles
    (afd:compiles_running 1, and afd:compiled_graphs one more at its end, as dynamo counts);
    0.1 s between the other chunks."""

    graphs, running = 3.0, 0
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/v1/models":
            body = json.dumps({"data": [{"id": "m"}]}).encode()
        else:
            body = f"afd:compiled_graphs {type(self).graphs}\nafd:compiles_running {type(self).running}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(4):
            if i == 2:
                type(self).running = 1
                time.sleep(1.6)
                type(self).graphs, type(self).running = type(self).graphs + 1, 0
            else:
                time.sleep(0.1)
            chunk = {"choices": [{"index": 0, "delta": {"content": f"{i} "}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_chat_stats_show_a_compile_and_leave_it_out_of_tok_s():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CompilingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen = list((text, replace(stats)) for text, stats in
                    chat.stream_answer(f"http://127.0.0.1:{server.server_address[1]}", [], chat.ChatParams()))
    finally:
        server.shutdown()
    text, stats = seen[-1]
    assert text == "0 1 2 3 "
    assert any(s.compiling for _, s in seen) and not stats.compiling
    assert "compiling a new shape" in next(s for _, s in seen if s.compiling).markdown()
    assert 1.0 < stats.compile_s < 2.5 and stats.compile_before_first_s == 0.0
    # 3 tokens after the first in ~0.2 s of decoding, not ~1.8 s
    assert stats.tokens_per_s > 5
    assert "without 1." in stats.markdown()
