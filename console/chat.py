"""Streaming chat against the running server's OpenAI REST API (httpx, server-sent events).

The console never calls the engine: it is a client of /v1/chat/completions like any other, so
it works the same against a monolithic server, an AFD deployment, or one on another machine.
Each answer reports its time to first token and its tokens per second. A wait for the next
chunk longer than COMPILE_CHECK_S asks the server's /metrics: while `afd:compiles_running` is
above 0 the stats say "compiling…" (a shape the server had not warmed up), and a wait during
which it compiled (that, or `afd:compiled_graphs` grew) is left out of tok/s.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from console import validate
from console.validate import ConsoleError


@dataclass(frozen=True)
class ChatParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    max_tokens: int = 32

    @classmethod
    def from_form(cls, temperature, top_p, top_k, repetition_penalty, max_tokens) -> "ChatParams":
        top_k = validate.integer(top_k, "top_k", -1, 1_000_000)
        if top_k == 0:
            raise ConsoleError("top_k must be -1 (off) or at least 1, got 0.")
        return cls(temperature=validate.number(temperature, "Temperature", 0.0, 2.0),
                   top_p=validate.number(top_p, "top_p", 0.0, 1.0, lo_open=True), top_k=top_k,
                   repetition_penalty=validate.number(repetition_penalty, "Repetition penalty", 0.0, 2.0, lo_open=True),
                   max_tokens=validate.integer(max_tokens, "Max tokens", 1, 4096))


COMPILE_CHECK_S = 1.0  # a wait this long for the next chunk asks the server whether it compiles
_METRIC = re.compile(r"^(afd:compiled_graphs|afd:compiles_running) (\S+)$", re.M)


@dataclass
class AnswerStats:
    tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    compile_s: float = 0.0  # waits during which the server compiled, after the first token
    compile_before_first_s: float = 0.0  # ... and before it (inside the time to first token)
    compiling: bool = False  # the server compiles now

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate: the tokens after the first over the time after the first, less compiles."""
        decoding = self.total_s - (self.ttft_s or 0.0) - self.compile_s
        if self.ttft_s is None or self.tokens < 2 or decoding <= 0:
            return None
        return (self.tokens - 1) / decoding

    def markdown(self) -> str:
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s * 1e3:.0f} ms"
        if self.compile_before_first_s:
            ttft += f" (compiling {self.compile_before_first_s:.1f} s of it)"
        rate = "-" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f} tok/s"
        if self.compile_s:
            rate += f" (without {self.compile_s:.1f} s of compiling)"
        now = " · **compiling a new shape on the server…**" if self.compiling else ""
        return f"**{self.tokens} tokens** · time to first token {ttft} · {rate} · total {self.total_s:.2f} s{now}"


def compile_state(client: httpx.Client, url: str, api_key: str | None) -> tuple[float, float] | None:
    """The server's (afd:compiled_graphs, afd:compiles_running), or None if it does not say."""
    try:
        found = dict(_METRIC.findall(client.get(f"{url}/metrics", headers=_headers(api_key), timeout=5).text))
    except httpx.HTTPError:
        return None
    if len(found) < 2:
        return None
    return float(found["afd:compiled_graphs"]), float(found["afd:compiles_running"])


def no_server_message(url: str) -> str:
    return (f"⚠️ No server is running at {url}. Start one on the **Launch** tab "
            f"(or run `afd serve` / `afd launch`), then send again.")


def _text(content) -> str:
    """A Chatbot message's content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return "" if content is None else str(content)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key.strip()}"} if api_key and api_key.strip() else {}


def _error_text(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:300] or r.reason_phrase


def model_name(client: httpx.Client, url: str, api_key: str | None) -> str:
    r = client.get(f"{url}/v1/models", headers=_headers(api_key))
    if r.status_code != 200:
        raise ConsoleError(f"{url}/v1/models answered {r.status_code}: {_error_text(r)}")
    return r.json()["data"][0]["id"]


def _lines(response: httpx.Response, idle_s: float) -> Iterator[str | None]:
    """The response's lines, and None each idle_s that none came (read on a thread: httpx's
    iterator cannot time out and resume)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for line in response.iter_lines():
                lines.put(line)
        except Exception as e:  # handed to the reader below
            lines.put(e)
        lines.put(StopIteration)

    threading.Thread(target=read, daemon=True, name="console chat stream").start()
    while True:
        try:
            item = lines.get(timeout=idle_s)
        except queue.Empty:
            yield None
            continue
        if item is StopIteration:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def stream_answer(url: str, messages: list[dict], params: ChatParams, api_key: str | None = None,
                  timeout_s: float = 120.0) -> Iterator[tuple[str, AnswerStats]]:
    """Yields (text so far, stats) as the answer streams in. Raises ConsoleError for no server
    or an API error."""
    url = url.rstrip("/")
    stats, text = AnswerStats(), ""
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=3.0)) as client:
            body = {"model": model_name(client, url, api_key), "messages": messages, "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": params.temperature,
                    "top_p": params.top_p, "top_k": params.top_k, "repetition_penalty": params.repetition_penalty,
                    "max_tokens": params.max_tokens}
            state = compile_state(client, url, api_key)
            graphs = state[0] if state else None  # at the start of the current wait
            start = last = time.perf_counter()
            chunks = 0
            with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_headers(api_key)) as r:
                if r.status_code != 200:
                    r.read()
                    raise ConsoleError(f"The server answered {r.status_code}: {_error_text(r)}")
                waited_compiling = False  # the current wait for a chunk has seen the server compile
                for line in _lines(r, COMPILE_CHECK_S):
                    now = time.perf_counter()
                    if line is None:  # no chunk for a while: is it compiling?
                        state = compile_state(client, url, api_key) if graphs is not None else None
                        if state is not None and (state[1] > 0 or state[0] > graphs) and not stats.compiling:
                            waited_compiling = stats.compiling = True
                            stats.total_s = now - start
                            yield text, stats
                        continue
                    if now - last >= COMPILE_CHECK_S and graphs is not None:
                        state = compile_state(client, url, api_key)  # a compile ends just before its step's chunk
                        waited_compiling = waited_compiling or (state is not None and state[0] > graphs)
                        graphs = state[0] if state else graphs
                    if waited_compiling:  # the wait that just ended was (mostly) a compile
                        gap = now - last
                        if stats.ttft_s is None:
                            stats.compile_before_first_s += gap
                        else:
                            stats.compile_s += gap
                        stats.compiling = waited_compiling = False
                    last = now
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise ConsoleError(f"The server reported an error: {event['error'].get('message')}")
                    if event.get("usage"):
                        stats.tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            chunks += 1
                            if stats.ttft_s is None:
                                stats.ttft_s = now - start
                            text += piece
                            stats.total_s = now - start
                            stats.tokens = max(stats.tokens, chunks)
                            yield text, stats
            stats.total_s = time.perf_counter() - start
    except httpx.ConnectError:
        raise ConsoleError(no_server_message(url)) from None
    except httpx.TimeoutException:
        raise ConsoleError(f"⚠️ The server at {url} did not answer within {timeout_s:.0f} s.") from None
    except httpx.HTTPError as e:
        raise ConsoleError(f"⚠️ Talking to {url} failed: {e}") from None
    yield text, stats


def respond(message: str, history: list | None, url: str, api_key: str, multi_turn: bool, temperature, top_p, top_k,
            repetition_penalty, max_tokens) -> Iterator[tuple[list[dict], str, str]]:
    """The Chat tab's handler: yields (chat history, stats markdown, cleared input box)."""
    history = [{"role": m["role"], "content": _text(m["content"])} for m in (history or [])]
    message = (message or "").strip()
    if not message:
        yield history, "Type a message first.", ""
        return
    try:
        params = ChatParams.from_form(temperature, top_p, top_k, repetition_penalty, max_tokens)
    except ConsoleError as e:
        yield history, f"⚠️ {e}", message
        return
    # The shipped demo model was trained on single-turn chats: earlier turns are sent only on request.
    earlier = [m for m in history if not m["content"].startswith("⚠️")] if multi_turn else []
    messages = [*earlier, {"role": "user", "content": message}]
    history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    yield history, "…", ""
    try:
        for text, stats in stream_answer(url or "", messages, params, api_key):
            history[-1] = {"role": "assistant", "content": text}
            yield history, stats.markdown(), ""
    except ConsoleError as e:
        history[-1] = {"role": "assistant", "content": str(e)}
        yield history, str(e), ""
