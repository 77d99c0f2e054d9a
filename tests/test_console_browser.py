"""End to end in headless Chromium: `afd console`, driven from the page alone.

Launches 1A1F on the shipped model compiled without the warm-up, chats "1 3 5 7 9" and sees
"11 13" while the stats say the server compiles and then give a decode rate without the
compile, reads each rank's compile lines in its Logs pane, stops (no ERROR line) and launches
again eager, records 3 decode steps of the running deployment and sees them labeled on the
timeline, runs a benchmark from the Bench tab (which leaves the checkout's `git status` as it
was), and stops the ranks. Screenshots of every tab go to
test-artifacts/console/ (or $AFD_TEST_ARTIFACTS/console/).

Needs the system Chromium (`apt-get install -y chromium`) and the playwright package; skipped
otherwise. Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from afd_compile.roles.rendezvous import free_port
from afd_compile.roles.launcher import die_with_parent

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`", allow_module_level=True)
_playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                  "(pip install -e '.[test]')")
sync_playwright, expect = _playwright.sync_playwright, _playwright.expect


@pytest.fixture
def artifacts() -> Path:
    path = Path(os.environ.get("AFD_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def console_url(artifacts):
    """`afd console` in its own process group, its output in a log file; stopped with SIGTERM."""
    port = free_port()
    log = open(artifacts / "console.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "afd_compile.cli", "console", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=die_with_parent, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (artifacts / "console.log").read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the console did not answer within 60 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # the console stops the ranks it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def wait_value(locator, text: str, timeout_s: float = 15.0, one_rank: bool = False) -> None:
    """Until the textarea's value holds text (has_text= reads text content, not a value);
    one_rank: and shows one rank's log (no "----- rank -----" headers)."""
    deadline = time.monotonic() + timeout_s
    while text not in locator.input_value() or (one_rank and "-----" in locator.input_value()):
        assert time.monotonic() < deadline, f"{text!r} not in {locator.input_value()[-2000:]!r}"
        time.sleep(0.25)


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


@pytest.mark.timeout(480)
def test_console_in_browser(console_url, artifacts):
    started = time.monotonic()
    checkout = git_status()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(console_url)
            page.locator("#launch-btn").wait_for(timeout=30_000)

            # Launch: a validation error first, then 1A1F compiled, without the warm-up, so that
            # the chat below waits for its shape's compile.
            page.locator("#afd-size textarea, #afd-size input").first.fill("2X2F")
            page.locator("#launch-btn").click()
            page.locator("#deployment-state").get_by_text("malformed afd_size").wait_for(timeout=15_000)
            page.locator("#afd-size textarea, #afd-size input").first.fill("1A1F")
            port = free_port()
            page.locator("#port input").fill(str(port))
            assert not page.locator("#enforce-eager input[type=checkbox]").is_checked()
            warmup = page.locator("#warmup input[type=checkbox]")
            assert warmup.is_checked()  # the servers' default
            warmup.uncheck()
            page.locator("#launch-btn").click()
            # One status line, replaced as the deployment starts: never "starting" beside "ready".
            page.locator("#deployment-state").get_by_text("1A1F ready").wait_for(timeout=120_000)
            assert "starting" not in page.locator("#deployment-state").inner_text()
            status = page.locator("#rank-status").inner_text()
            assert "attention 0" in status and "ffn 0" in status and "ready" in status
            commands = page.locator("#commands").inner_text()
            assert "afd ffn" in commands and "--no-warmup" in commands
            page.screenshot(path=str(artifacts / "1-launch.png"), full_page=True)

            # Chat: the server URL came from the Launch tab; the reply waits for a compile, which
            # the stats name and leave out of tok/s (a compile inside it once read "0.8 tok/s").
            page.get_by_role("tab", name="Chat").click()
            assert page.locator("#server-url textarea, #server-url input").first.input_value() == \
                f"http://127.0.0.1:{port}"
            box = page.locator("#chat-input textarea, #chat-input input").first
            box.fill("1 3 5 7 9")
            box.press("Enter")
            page.locator("#chat-stats").get_by_text("compiling a new shape", exact=False).wait_for(timeout=60_000)
            page.locator("#chatbot").get_by_text("11 13", exact=False).wait_for(timeout=240_000)
            page.locator("#chat-stats").get_by_text("of compiling)", exact=False).wait_for(timeout=60_000)
            stats = page.locator("#chat-stats").inner_text()
            assert "compiling a new shape" not in stats, stats
            assert float(stats.split(" tok/s")[0].split()[-1]) > 5, stats
            page.screenshot(path=str(artifacts / "2-chat.png"), full_page=True)

            # Each rank's log, live at INFO: the compiles the chat waited for, per rank.
            page.get_by_role("tab", name="Launch").click()
            page.locator("#log-rank").get_by_text("attention 0", exact=True).click()
            logs = page.locator("#logs textarea")
            wait_value(logs, "compiled attention decode step", one_rank=True)
            assert "FFN decode round" not in logs.input_value() and "POST /v1/chat/completions" in logs.input_value()
            page.locator("#log-rank").get_by_text("ffn 0", exact=True).click()
            wait_value(logs, "compiled FFN decode round", one_rank=True)
            page.screenshot(path=str(artifacts / "2-logs.png"), full_page=True)

            # Stopped (INFO lines only), then 1A1F again, eager, for the trace.
            page.locator("#stop-btn").click()
            page.locator("#deployment-state").get_by_text("1A1F stopped.").wait_for(timeout=60_000)
            page.locator("#log-rank").get_by_text("all ranks", exact=True).click()
            wait_value(logs, "all attention peers left")
            assert " ERROR " not in logs.input_value() and "Traceback" not in logs.input_value()
            page.locator("#enforce-eager input[type=checkbox]").check()
            page.locator("#launch-btn").click()
            page.locator("#deployment-state").get_by_text("1A1F ready").wait_for(timeout=120_000)

            # Traces: record 3 decode steps with the same settings and see the timeline.
            page.get_by_role("tab", name="Traces").click()
            page.locator("#trace-steps input").fill("3")
            page.locator("#record-btn").click()
            message = page.locator("#trace-message")
            message.get_by_text(re.compile("Recorded|⚠️")).wait_for(timeout=120_000)
            assert "Recorded" in message.inner_text(), message.inner_text()
            # The rendered plotly figure with its bars, not the empty plot's placeholder icon.
            page.locator("#timeline .js-plotly-plot .barlayer path").first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            assert "from the running deployment" in page.locator("#trace-message").inner_text()
            summary = page.locator("#trace-summary").inner_text()
            assert "overlap efficiency" in summary and "micro-batch" in summary and "The recording has steps 0.." \
                in summary, summary
            assert "attention 0" in page.locator("#trace-table").inner_text()
            labels = page.locator("#timeline .annotation-text").all_text_contents()
            # steps 0..N-1 of the recording, the prefills between the 3 decode steps marked
            assert [t.split()[1] for t in labels] == [str(k) for k in range(len(labels))], labels
            assert len([t for t in labels if "prefill" not in t]) == 3, labels
            page.screenshot(path=str(artifacts / "3-traces.png"), full_page=True)
            with page.expect_download(timeout=30_000) as download:
                page.locator("#trace-download").click()
            trace = json.loads(Path(download.value.path()).read_text())
            names = {e["args"]["name"] for e in trace["traceEvents"] if e.get("ph") == "M"}
            assert names == {"attention 0", "ffn 0"}, names
            decode = {e["args"]["step"] for e in trace["traceEvents"] if e.get("ph") == "X"
                      and e["args"].get("phase") == "decode"}
            assert len(decode) == 3, decode  # N steps asked for: N decode steps recorded

            # Bench: the default scenario's results render; a run of another scenario from the
            # page shows only that scenario's options and writes outside the checkout.
            page.get_by_role("tab", name="Bench").click()
            page.locator("#bench-info").get_by_text("serve.json", exact=False).wait_for(timeout=30_000)
            page.get_by_text("Options", exact=True).click()
            page.locator("#bench-deployments").wait_for(timeout=15_000)
            page.locator("#scenario").get_by_text("connector", exact=True).click()
            page.get_by_text("This scenario has no options.").wait_for(timeout=15_000)
            page.locator("#bench-deployments").wait_for(state="hidden", timeout=15_000)
            page.locator("#bench-run").click()
            wait_value(page.locator("#bench-log textarea"), "wrote", timeout_s=120)
            # "wrote" reaches the log one update before the info below swaps the committed result
            # (shown since the scenario was picked) for this run's.
            info = page.locator("#bench-info")
            expect(info).not_to_contain_text("benchmarks/results", timeout=30_000)
            expect(info).to_contain_text("connector.json")
            assert git_status() == checkout
            page.screenshot(path=str(artifacts / "4-bench.png"), full_page=True)

            # Stop the ranks from the page.
            page.get_by_role("tab", name="Launch").click()
            page.locator("#stop-btn").click()
            page.locator("#deployment-state").get_by_text("1A1F stopped.").wait_for(timeout=60_000)
            assert "ready" not in page.locator("#rank-status").inner_text()
            page.screenshot(path=str(artifacts / "5-stopped.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(artifacts / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    print(f"console browser test: {time.monotonic() - started:.1f} s; screenshots in {artifacts}")
