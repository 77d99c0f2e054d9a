"""The OpenAI-compatible server, end to end: real `afd serve` / `afd launch` / `afd ffn`
processes on free ports, driven with curl, httpx and the official `openai` client.

The deployments of this module start once, side by side, and are shared by its tests:
  mono   `afd serve` (monolithic), the model named by its --model path
  keyed  `afd serve --api-key ...`
  afd    `afd launch --afd-size 1A1F --served-model-name /data2/models/deepseek-v2-lite`
  pair   `afd ffn --rank 0` + `afd serve --afd-size 1A1F --rank 0` as two processes this test
         owns, so it can kill the FFN rank
The shipped model continues "1 3 5 7 9" with "11 13 15 17 19 21 23 25" (then EOS).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import concurrent.futures
import contextlib
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_fixtures import SEED_MODEL_NAME, sse_chunks, start_afd_pair, start_launch, start_monolithic

pytestmark = pytest.mark.timeout(600)

ODD = "1 3 5 7 9"
ODD_ANSWER = "11 13 15 17 19 21 23 25"
API_KEY = "sk-afd-test"
CONTEXT = 512  # the shipped model's max_position_embeddings (the server's default max_model_len)

# The seed README's request body, character for character (vllm-afd-demo-README.md, "测试请求").
SEED_BODY = """{ "model": "/data2/models/deepseek-v2-lite",
"messages": [
{"role": "user", "content": "1 3 5 7 9"} ],
"temperature": 0.6,
"repetition_penalty": 1.0,
"top_p": 0.95,
"top_k": 40,
"max_tokens": 20,
"stream": false}"""


# ---------------------------------------------------------------- deployments


@pytest.fixture(scope="module")
def deployments(shipped_model, tmp_path_factory):
    """Starts every deployment at once (their imports overlap), stops them all at the end."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    started = {}
    try:
        started["mono"] = start_monolithic(shipped_model, log_dir)
        started["afd"] = start_launch(shipped_model, log_dir, extra=["--served-model-name", SEED_MODEL_NAME])
        started["pair"] = start_afd_pair(shipped_model, log_dir)
        started["keyed"] = start_monolithic(shipped_model, log_dir, "keyed", ["--api-key", API_KEY])
        yield started
    finally:
        for d in started.values():
            d.stop()


@pytest.fixture(scope="module")
def mono(deployments):
    return deployments["mono"].wait_ready()


@pytest.fixture(scope="module")
def afd(deployments):
    return deployments["afd"].wait_ready()


@pytest.fixture(scope="module")
def keyed(deployments):
    return deployments["keyed"].wait_ready()


@pytest.fixture(scope="module")
def pair(deployments):
    return deployments["pair"].wait_ready()


@pytest.fixture(scope="module")
def tokenizer(shipped_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model)


def chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def post(d, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{d.url}{path}", json=body, headers=d.headers(), timeout=kw.pop("timeout", 60), **kw)


def chat(d, content: str, **params) -> httpx.Response:
    return post(d, "/v1/chat/completions", {"model": d.model, "messages": [{"role": "user", "content": content}],
                                            **params})


def assert_error(r: httpx.Response, status: int, param: str | None = ..., contains: tuple[str, ...] = ()) -> dict:
    """OpenAI's error schema: {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == status
    if param is not ...:
        assert err["param"] == param, err
    for text in contains:
        assert text in err["message"], err
    return err


def metric(d, name: str) -> float:
    return d.metric(name)


def wait_metric(d, name: str, value: float, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (current := metric(d, name)) != value:
        assert time.monotonic() < deadline, f"{name} is {current}, not {value}, after {timeout_s} s"
        time.sleep(0.1)


def assert_chat_completion(body: dict, model: str) -> str:
    """The chat.completion object's shape; returns the first choice's content."""
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == model
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == len(ODD.split()) + 3  # <|bos|> <|user|> ... <|assistant|>
    assert 1 <= usage["completion_tokens"] <= 20
    return choice["message"]["content"]


def send_raw(url: str, body: str) -> tuple[int, str]:
    """POSTs body as the seed does, with curl when installed (else httpx); returns (status, text)."""
    if shutil.which("curl"):
        proc = subprocess.run(["curl", "-v", url, "-H", "Content-Type: application/json", "-d", body, "-sS",
                               "--max-time", "60", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        text, _, status = proc.stdout.rpartition("\n")
        return int(status), text
    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    return r.status_code, r.text


# ---------------------------------------------------------------- 1. the seed's curl request


def test_seed_curl_request(mono):
    """Oracle: the seed README's curl request (only host and model changed) answers 200 with a
    chat.completion whose content continues the odd numbers: temperature 0.6 with top_k 40 on this
    model is near-deterministic (the answer's tokens each have probability > 0.999)."""
    status, text = send_raw(f"{mono.url}/v1/chat/completions", SEED_BODY.replace(SEED_MODEL_NAME, mono.model))
    assert status == 200, text
    content = assert_chat_completion(json.loads(text), mono.model)
    assert content.startswith("11 13"), content
    assert all(w.isdigit() for w in content.split()), content


def test_seed_curl_request_greedy_is_exact(mono):
    """Oracle: the shipped model's known greedy continuation of 1 3 5 7 9."""
    status, text = send_raw(f"{mono.url}/v1/chat/completions",
                            SEED_BODY.replace(SEED_MODEL_NAME, mono.model).replace('"temperature": 0.6',
                                                                                   '"temperature": 0.0'))
    assert status == 200, text
    body = json.loads(text)
    assert assert_chat_completion(body, mono.model) == ODD_ANSWER
    assert body["choices"][0]["finish_reason"] == "stop"


def test_seed_curl_request_unchanged_on_afd(afd):
    """Oracle: served as the seed serves it (1A1F, --served-model-name /data2/models/deepseek-v2-lite),
    the README's request works byte for byte, model field included."""
    status, text = send_raw(f"{afd.url}/v1/chat/completions", SEED_BODY)
    assert status == 200, text
    content = assert_chat_completion(json.loads(text), SEED_MODEL_NAME)
    assert content.startswith("11 13"), content


def test_startup_log_lines(mono, afd):
    """Oracle: the seed README's success check, "Application startup complete." in the server log
    (for `afd launch`, relayed from attention rank 0)."""
    assert "Application startup complete." in mono.server.stderr()
    launch_log = afd.server.stderr()
    assert re.search(r"\[attention 0\] .*Application startup complete\.", launch_log), launch_log[-2000:]


# ---------------------------------------------------------------- 6. backend down
# (early in the file: once its FFN rank is dead, the pair's idle ping-pong stops taking CPU)


def test_health_is_degraded_while_the_ffn_rank_is_silent(pair):
    """SIGSTOP of the FFN rank: within STALL_LIMIT_S (+2 s) /health says 503 "degraded" and why;
    after SIGCONT it is "ok" again and the request that waited through the stall completes."""
    from afd_compile.serve.async_engine import STALL_LIMIT_S

    ffn = pair.procs[0]
    ffn.proc.send_signal(signal.SIGSTOP)
    try:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        request = pool.submit(chat, pair, ODD, temperature=0, timeout=60)
        deadline = time.monotonic() + STALL_LIMIT_S + 2
        while (h := httpx.get(f"{pair.url}/health", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "still ok while the FFN rank is stopped"
            time.sleep(0.2)
        assert h.status_code == 503 and h.json()["status"] == "degraded", h.text
        assert "waiting for the FFN ranks" in h.json()["message"], h.text
    finally:
        ffn.proc.send_signal(signal.SIGCONT)
    r = request.result(60)
    pool.shutdown()
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ODD_ANSWER
    assert httpx.get(f"{pair.url}/health", timeout=5).json()["status"] == "ok"


def test_ffn_rank_killed_gives_503(pair):
    """Oracle: kill -9 of the FFN rank, with nobody to restart it, is the backend going away: within
    10 s /health turns 503 "degraded" (the attention rank waits for the FFN rank to come back, see
    test_rank_restart.py) and requests fail at once with 503 in the error schema (no hang)."""
    r = chat(pair, ODD, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ODD_ANSWER
    ffn = pair.procs[0]
    ffn.proc.send_signal(signal.SIGKILL)
    ffn.proc.wait(10)
    deadline = time.monotonic() + 10
    while (h := httpx.get(f"{pair.url}/health", timeout=5)).status_code != 503:
        assert time.monotonic() < deadline, h.text
        time.sleep(0.1)
    assert h.json()["status"] == "degraded", h.text
    start = time.monotonic()
    err = assert_error(chat(pair, ODD, temperature=0, timeout=10), 503)
    assert err["type"] == "service_unavailable"
    assert time.monotonic() - start < 10
    # it names the failure as it was (a closed link, seen at once), without gloo's paths or ports
    for said in (h.json()["message"], err["message"]):
        assert "peer closed the connection" in said and ".cc:" not in said and "silent" not in said, said
        assert not re.search(r"\]:\d+", said), said
    # known down: streamed requests and text completions get the 503 before any stream starts
    assert_error(chat(pair, ODD, stream=True, timeout=10), 503)
    assert_error(post(pair, "/v1/completions", {"prompt": "1 2", "stream": True}, timeout=10), 503)
    assert pair.server.proc.poll() is None  # the API server itself stays up to say so


# ---------------------------------------------------------------- 2. the openai client


@pytest.fixture(scope="module", params=["monolithic", "1A1F"])
def api(request, deployments):
    d = deployments["mono" if request.param == "monolithic" else "afd"].wait_ready()
    return d, openai.OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_openai_chat(api):
    """Oracle: the model's known greedy answer; usage counts the 8 prompt tokens and the 8 numbers + EOS."""
    d, client = api
    r = client.chat.completions.create(model=d.model, messages=[{"role": "user", "content": ODD}], temperature=0,
                                       max_tokens=20)
    assert r.object == "chat.completion" and r.model == d.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ODD_ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 9, 17)


def test_openai_completions(api, tokenizer):
    """Oracle: a text completion of the chat template's token ids equals the chat answer; a list of
    prompts gives, per prompt, what that prompt gives alone."""
    d, client = api
    r = client.completions.create(model=d.model, prompt=chat_ids(tokenizer, ODD), temperature=0, max_tokens=20)
    assert r.object == "text_completion"
    assert r.choices[0].text == ODD_ANSWER and r.choices[0].finish_reason == "stop"
    prompts = ["<|user|> 2 4 6 <|assistant|>", "<|user|> 10 20 30 <|assistant|>", "<|user|> 1 3 5 7 9 <|assistant|>"]
    alone = [client.completions.create(model=d.model, prompt=p, temperature=0, max_tokens=12).choices[0].text
             for p in prompts]
    assert alone[2] == ODD_ANSWER
    together = client.completions.create(model=d.model, prompt=prompts, temperature=0, max_tokens=12)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == alone
    assert together.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)


def test_openai_streaming_chat(api):
    """Oracle: the deltas concatenate to the non-streamed answer; the last choice chunk carries
    finish_reason; include_usage adds a final chunk with no choices and the usage."""
    d, client = api
    stream = client.chat.completions.create(model=d.model, messages=[{"role": "user", "content": ODD}],
                                            temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) > 1  # streamed, not one blob
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == ODD_ANSWER
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 9)


def test_openai_streaming_completion_with_stop(api):
    """Oracle: a stop string never leaks into the streamed text, though it spans tokens."""
    d, client = api
    chunks = list(client.completions.create(model=d.model, prompt="<|user|> 1 3 5 7 9 <|assistant|>", temperature=0,
                                            max_tokens=20, stop=[" 17 1"], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "11 13 15"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_n2_with_seed(api):
    """Oracle: n=2 gives choices 0 and 1; the same seeded request gives the same choices again."""
    d, client = api
    kw = dict(model=d.model, messages=[{"role": "user", "content": "5 10 15"}], temperature=1.5, top_p=0.9,
              max_tokens=8, n=2, seed=1234)
    first, second = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.prompt_tokens == 6  # counted once, not per choice
    assert 2 <= first.usage.completion_tokens <= 16
    text = dict(model=d.model, prompt="<|user|> 5 10 15 <|assistant|>", temperature=1.5, max_tokens=8, n=2, seed=99)
    a, b = client.completions.create(**text), client.completions.create(**text)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_openai_logprobs(api):
    """Oracle: greedy picks the most likely token, so each chosen token is its top_logprobs[0], and the
    tokens spell the answer; completions report the same log-probabilities."""
    d, client = api
    r = client.chat.completions.create(model=d.model, messages=[{"role": "user", "content": ODD}], temperature=0,
                                       max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ["11", "13", "15", "17"]
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert c.bytes == list(c.token.encode())
    t = client.completions.create(model=d.model, prompt="<|user|> 1 3 5 7 9 <|assistant|>", temperature=0,
                                  max_tokens=4, logprobs=2)
    lp = t.choices[0].logprobs
    assert lp.tokens == ["11", "13", "15", "17"]
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 and max(top, key=top.get) == tok for top, tok in zip(lp.top_logprobs, lp.tokens))


def test_openai_stop_and_max_completion_tokens(api):
    """Oracle: the known answer cut at the stop string ("stop") or after 3 tokens ("length")."""
    d, client = api
    messages = [{"role": "user", "content": ODD}]
    r = client.chat.completions.create(model=d.model, messages=messages, temperature=0, stop=[" 17", "zzz"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("11 13 15", "stop")
    r = client.chat.completions.create(model=d.model, messages=messages, temperature=0, stop=" 13")
    assert r.choices[0].message.content == "11"
    r = client.chat.completions.create(model=d.model, messages=messages, temperature=0, max_completion_tokens=3)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("11 13 15", "length")
    assert r.usage.completion_tokens == 3


def test_openai_models(api):
    """Oracle: the one served model, by its served name, with the context length."""
    d, client = api
    models = client.models.list().data
    assert [m.id for m in models] == [d.model]
    assert models[0].object == "model"
    assert httpx.get(f"{d.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"] == CONTEXT


def test_version_tokenize_detokenize(mono, tokenizer):
    """vLLM's extras. Oracle: the tokenizer itself; /tokenize of messages is the chat prompt the
    chat endpoint builds (its prompt_tokens), and /detokenize inverts /tokenize."""
    from afd_compile import __version__

    assert httpx.get(f"{mono.url}/version", timeout=10).json() == {"version": __version__}
    r = post(mono, "/tokenize", {"prompt": "2 4 6"}).json()
    assert r == {"count": 4, "max_model_len": CONTEXT, "tokens": tokenizer("2 4 6")["input_ids"]}
    bare = post(mono, "/tokenize", {"prompt": "2 4 6", "add_special_tokens": False}).json()["tokens"]
    assert bare == tokenizer("2 4 6", add_special_tokens=False)["input_ids"]
    messages = post(mono, "/tokenize", {"messages": [{"role": "user", "content": ODD}]}).json()
    assert messages["tokens"] == chat_ids(tokenizer, ODD)
    assert messages["count"] == chat(mono, ODD, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert post(mono, "/detokenize", {"tokens": bare}).json() == {"prompt": "2 4 6"}
    assert_error(post(mono, "/detokenize", {"tokens": [5, 10**6]}), 400, "tokens", contains=("1000000",))
    assert_error(post(mono, "/tokenize", {"prompt": ODD, "model": "other"}), 404, "model")
    assert_error(post(mono, "/tokenize", {"nothing": 1}), 400)


def test_streamed_chat_names_the_role_in_the_first_delta_only(mono):
    """As OpenAI and vLLM: role "assistant" in each choice's first delta, content alone after."""
    r = post(mono, "/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "max_tokens": 6,
                                            "temperature": 0, "n": 2, "seed": 1, "stream": True})
    deltas = {0: [], 1: []}
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith('data: {')]
    for chunk in events:
        for choice in chunk["choices"]:
            deltas[choice["index"]].append(choice["delta"])
    for ds in deltas.values():
        assert ds[0]["role"] == "assistant"
        assert all("role" not in d for d in ds[1:]), ds


def test_openai_client_errors(api):
    """Oracle: the client maps our error schema onto its exception classes."""
    d, client = api
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": ODD}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=d.model, messages=[{"role": "user", "content": ODD}], temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_greedy_equal_monolithic_and_afd(mono, afd, tokenizer):
    """Oracle: the monolithic server; a 1A1F deployment must give the same greedy tokens (and the
    same log-probabilities, to float tolerance)."""
    prompts = [ODD, "40 30 20", "7 14 21", "500 501 502", "2 4 8 16"]

    def run(d):
        out = []
        for p in prompts:
            r = chat(d, p, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            tokens = [(c["token"], c["logprob"]) for c in choice["logprobs"]["content"]]
            out.append((choice["message"]["content"], tokens))
        r = post(d, "/v1/completions", {"model": d.model, "prompt": [chat_ids(tokenizer, p) for p in prompts],
                                        "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        return out, [c["text"] for c in r.json()["choices"]]

    (mono_chat, mono_text), (afd_chat, afd_text) = run(mono), run(afd)
    assert mono_chat[0][0] == ODD_ANSWER
    assert [c for c, _ in afd_chat] == [c for c, _ in mono_chat]
    assert afd_text == mono_text == [c for c, _ in mono_chat]
    for (_, a), (_, m) in zip(afd_chat, mono_chat):
        assert [t for t, _ in a] == [t for t, _ in m]
        assert [lp for _, lp in a] == pytest.approx([lp for _, lp in m], abs=1e-3)


# ---------------------------------------------------------------- 3. concurrency


def _mixed_requests(model: str) -> list[dict]:
    """32 requests: greedy (chat, text, streamed) mixed with every sampling knob."""
    prompts = ["1 3 5 7 9", "40 30 20", "7 14 21", "2 4 6 8", "100 200 300", "9 8 7", "11 22 33", "3 6 9 12"]
    sampled = [dict(temperature=0.8), dict(temperature=1.0, top_p=0.8), dict(temperature=0.7, top_k=5),
               dict(temperature=1.2, min_p=0.1), dict(temperature=0.9, repetition_penalty=1.3),
               dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5), dict(temperature=1.0, seed=7),
               dict(temperature=0.5, top_p=0.95, top_k=40, seed=3)]
    out = []
    for i in range(32):
        prompt = prompts[i % len(prompts)]
        kind = i % 4
        if kind == 0:  # greedy chat
            body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 16}
        elif kind == 1:  # greedy text completion, streamed every other time
            body = {"prompt": f"<|user|> {prompt} <|assistant|>", "temperature": 0, "max_tokens": 16,
                    "stream": i % 8 == 5}
        elif kind == 2:  # greedy chat, streamed, with a repetition penalty and a long tail
            body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 24,
                    "repetition_penalty": 1.1, "stream": True}
        else:  # sampled, every knob, half of them streamed
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "stream": i % 8 == 7,
                    **sampled[(i // 4) % len(sampled)]}
        body["model"] = model
        out.append({"path": "/v1/chat/completions" if "messages" in body else "/v1/completions", "body": body,
                    "greedy": body.get("temperature") == 0})
    return out


async def _send(client: httpx.AsyncClient, req: dict) -> tuple[int, str]:
    """Returns (status, generated text) of one request, streamed or not."""
    chat_api = req["path"] == "/v1/chat/completions"
    if not req["body"].get("stream"):
        r = await client.post(req["path"], json=req["body"])
        if r.status_code != 200:
            return r.status_code, r.text
        c = r.json()["choices"][0]
        return 200, c["message"]["content"] if chat_api else c["text"]
    text, done = [], False
    async with client.stream("POST", req["path"], json=req["body"]) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()
        async for chunk in sse_chunks(r):
            if chunk is None:
                done = True
                continue
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text.append(c["delta"].get("content", "") if chat_api else c["text"])
    assert done, "the stream did not end with [DONE]"
    return 200, "".join(text)


def test_32_concurrent_mixed_requests(mono):
    """Oracle: each greedy request run alone on the idle server; in a busy batch of 32 mixed
    requests (more than the 16 KV slots, so some wait) it must return exactly the same text, and
    every request must complete with 200."""
    reqs = _mixed_requests(mono.model)

    async def go():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=mono.url, timeout=180, limits=limits) as client:
            alone = {}
            for i, req in enumerate(reqs):
                if req["greedy"]:
                    alone[i] = await _send(client, req)
            busy = await asyncio.gather(*(_send(client, r) for r in reqs))
            return alone, busy

    alone, busy = asyncio.run(go())
    assert [s for s, _ in busy] == [200] * 32, [t for s, t in busy if s != 200]
    assert alone[0] == (200, ODD_ANSWER)
    mismatched = {i: (alone[i][1], busy[i][1]) for i in alone if busy[i][1] != alone[i][1]}
    assert not mismatched, mismatched
    assert all(t.strip() for _, t in busy)  # every request generated something
    wait_metric(mono, "afd:num_requests_running", 0)
    wait_metric(mono, "afd:num_requests_waiting", 0)


# ---------------------------------------------------------------- 4. errors


def long_numbers(n: int) -> str:
    return " ".join(str(i % 100) for i in range(n))  # every number below 1000 is one token


CHAT_ERRORS = {
    "temperature -1": ({"temperature": -1}, "temperature"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "temperature hot": ({"temperature": "hot"}, "temperature"),
    "top_k string": ({"top_k": "many"}, "top_k"),
    "n 0": ({"n": 0}, "n"),
    "n 17": ({"n": 17}, "n"),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "stop int": ({"stop": 5}, None),
    "stream string": ({"stream": "maybe"}, "stream"),
}


@pytest.mark.parametrize("case", sorted(CHAT_ERRORS))
def test_bad_sampling_params_400(mono, case):
    """Oracle: OpenAI answers invalid parameters with 400 naming the parameter."""
    extra, param = CHAT_ERRORS[case]
    r = chat(mono, ODD, **extra)
    err = assert_error(r, 400, **({} if param is None else {"param": param}))
    assert err["type"] == "invalid_request_error"


def test_bad_bodies_400(mono):
    """Oracle: malformed requests are 400 in the error schema (never a 5xx or a bare FastAPI detail)."""
    url = f"{mono.url}/v1/chat/completions"
    assert_error(post(mono, "/v1/chat/completions", {"model": mono.model}), 400, "messages")
    assert_error(post(mono, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(mono, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), 400)
    assert_error(post(mono, "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}), 400)
    assert_error(post(mono, "/v1/chat/completions", [1, 2]), 400, None)
    assert_error(httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400, None)
    assert_error(post(mono, "/v1/completions", {"model": mono.model}), 400, "prompt")
    assert_error(post(mono, "/v1/completions", {"prompt": []}), 400, "prompt")
    assert_error(post(mono, "/v1/completions", {"prompt": ""}), 400, "prompt")
    assert_error(post(mono, "/v1/completions", {"prompt": [1, 5, 999999]}), 400, contains=("1007",))
    assert_error(post(mono, "/v1/completions", {"prompt": "1 2", "logprobs": 21}), 400, "logprobs")
    assert_error(post(mono, "/v1/completions", {"prompt": "1 2", "stop": [""]}), 400, contains=("stop",))


def test_seed_out_of_range_400_and_server_survives(mono):
    """Oracle: torch seeds are 64-bit; a larger one is the request's error (400), not the engine's:
    the server stays healthy and keeps answering correctly."""
    assert_error(chat(mono, ODD, seed=2**64, temperature=1.0, max_tokens=2), 400, contains=("seed",))
    assert_error(chat(mono, ODD, seed=-(2**63) - 1, max_tokens=2), 400, contains=("seed",))
    assert chat(mono, ODD, seed=2**64 - 1, temperature=1.0, max_tokens=2).status_code == 200
    assert httpx.get(f"{mono.url}/health", timeout=10).status_code == 200
    assert chat(mono, ODD, temperature=0).json()["choices"][0]["message"]["content"] == ODD_ANSWER


def test_prompt_longer_than_context_400(mono, tokenizer):
    """Oracle: the context is 512 tokens; the message names the limit and the prompt's length."""
    content = long_numbers(600)
    n = len(chat_ids(tokenizer, content))
    assert n == 603
    for stream in (False, True):
        err = assert_error(chat(mono, content, stream=stream), 400, contains=(str(CONTEXT), str(n)))
        assert err["type"] == "invalid_request_error"
    prompt = long_numbers(CONTEXT - 1)
    assert len(tokenizer(prompt)["input_ids"]) == CONTEXT  # bos first
    assert_error(post(mono, "/v1/completions", {"prompt": prompt, "max_tokens": 1}), 400, "prompt",
                 contains=(str(CONTEXT),))
    assert_error(chat(mono, content), 400, "messages")


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(mono):
    """A ~900 KB prompt (under the 1 MiB body limit) could not fit 512 tokens: 400 naming its
    length in characters (the check before tokenizing, not the token count after), both endpoints."""
    huge = "9 " * 450_000
    for path, body in (("/v1/completions", {"prompt": huge, "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})):
        assert_error(post(mono, path, body), 400, contains=("900000 characters", str(CONTEXT)))


def test_prompt_plus_max_tokens_over_context_400(mono):
    """Oracle: 8 prompt tokens + 505 completion tokens = 513 > 512; 8 + 504 = 512 fits."""
    err = assert_error(chat(mono, ODD, max_tokens=CONTEXT - 8 + 1), 400, "max_tokens",
                       contains=(str(CONTEXT), str(CONTEXT + 1), "8"))
    assert err["type"] == "invalid_request_error"
    assert_error(chat(mono, ODD, max_completion_tokens=10**9), 400, contains=(str(CONTEXT),))
    r = chat(mono, ODD, max_tokens=CONTEXT - 8, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ODD_ANSWER


def test_unknown_model_404(mono):
    """Oracle: OpenAI answers an unknown model with 404, param "model"."""
    r = post(mono, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": ODD}]})
    assert_error(r, 404, "model", contains=("gpt-4",))
    assert_error(post(mono, "/v1/completions", {"model": "gpt-4", "prompt": "1 2"}), 404, "model")


def test_unknown_route_and_method_in_error_schema(mono):
    """Oracle: even FastAPI's own 404/405 come in OpenAI's error schema."""
    assert_error(httpx.get(f"{mono.url}/v1/no-such-thing", timeout=10), 404)
    r = httpx.get(f"{mono.url}/v1/chat/completions", timeout=10)
    assert_error(r, 405)
    assert "POST" in r.headers.get("allow", "")


def test_body_over_1mib_413(mono):
    """Oracle: bodies are capped at 1 MiB, whether declared (Content-Length) or streamed (chunked)."""
    limit = 1 << 20
    big = json.dumps({"model": mono.model, "prompt": "1 " * (limit // 2 + 10)}).encode()
    assert len(big) > limit
    r = httpx.post(f"{mono.url}/v1/completions", content=big, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert_error(r, 413, contains=(str(limit),))

    def chunks():
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]

    r = httpx.post(f"{mono.url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, contains=(str(limit),))
    # just under the limit is read and answered (here: a 400, the prompt is over the context)
    small = json.dumps({"model": mono.model, "prompt": "1 " * 1000}).encode()
    assert_error(httpx.post(f"{mono.url}/v1/completions", content=small, headers={"Content-Type": "application/json"},
                            timeout=30), 400)
    assert httpx.get(f"{mono.url}/health", timeout=10).status_code == 200


def test_api_key(keyed):
    """Oracle: with --api-key, every endpoint but /health needs `Authorization: Bearer KEY` (401 in
    the error schema otherwise); the right key works, also through the openai client."""
    body = {"model": keyed.model, "messages": [{"role": "user", "content": ODD}], "temperature": 0}
    url = f"{keyed.url}/v1/chat/completions"
    assert_error(httpx.post(url, json=body, timeout=30), 401)
    for wrong in ("Bearer nope", f"Bearer {API_KEY}x", API_KEY, f"Basic {API_KEY}"):
        err = assert_error(httpx.post(url, json=body, headers={"Authorization": wrong}, timeout=30), 401)
        assert err["type"] == "authentication_error"
    assert_error(httpx.get(f"{keyed.url}/v1/models", timeout=10), 401)
    assert_error(httpx.get(f"{keyed.url}/metrics", timeout=10), 401)
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
    r = httpx.post(url, json=body, headers=keyed.headers(), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ODD_ANSWER
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [keyed.model]


def test_no_5xx_on_odd_requests(mono):
    """Oracle: whatever a client sends, the server answers below 500 and stays healthy."""
    odd = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello 🙂 ∑ \x00"}], "max_tokens": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}], "max_tokens": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "max_tokens": 3,
                                  "stop_token_ids": [10**6, -1]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "max_tokens": 3, "top_k": 10**6}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "max_tokens": 3,
                                  "temperature": 1e-30}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "max_tokens": 3, "n": 16,
                                  "temperature": 2.0, "seed": 2**64 - 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "max_tokens": 3,
                                  "stream": True, "n": 3, "stop": ["1", "3"], "logprobs": True, "top_logprobs": 20}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "unknown_field": {"a": 1}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}], "temperature": float("1e400")}),
        ("/v1/completions", {"prompt": [[1, 5], [8, 10, 12]], "max_tokens": 2, "echo": True, "logprobs": 0}),
        ("/v1/completions", {"prompt": [1, 5, -3], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "1 2", "max_tokens": 2, "stream": True, "echo": True, "logprobs": 1,
                             "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"prompt": ["1 2", ""], "max_tokens": 2}),
        ("/v1/completions", {"prompt": {"a": 1}}),
        ("/v1/completions", {"prompt": "1 2", "max_tokens": 10**30}),
    ]
    for path, body in odd:
        r = httpx.post(f"{mono.url}{path}", content=json.dumps(body, allow_nan=True),
                       headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert_error(r, r.status_code)
        elif body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            assert '"error"' not in r.text, r.text
    assert httpx.get(f"{mono.url}/health", timeout=10).status_code == 200
    assert chat(mono, ODD, temperature=0).json()["choices"][0]["message"]["content"] == ODD_ANSWER


# ---------------------------------------------------------------- 5. client disconnect


def test_stream_disconnect_aborts_request(mono):
    """Oracle: a request that would run for 500 tokens (ignore_eos) is running while its stream is
    open; once the client hangs up, afd:num_requests_running drops to 0 and generation stops far short
    of 500 tokens."""
    tokens_before = metric(mono, "afd:generation_tokens_total")
    aborted_before = metric(mono, 'afd:requests_finished_total{finish_reason="abort"}')
    body = {"model": mono.model, "messages": [{"role": "user", "content": ODD}], "max_tokens": 500,
            "ignore_eos": True, "temperature": 0, "stream": True}
    client = httpx.Client(timeout=60)
    try:
        with client.stream("POST", f"{mono.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = 0
            for line in lines:
                received += line.startswith("data: ")
                if received >= 3:
                    break
            assert metric(mono, "afd:num_requests_running") == 1
    finally:
        client.close()  # the connection goes with it
    wait_metric(mono, "afd:num_requests_running", 0)  # the abandoned request was aborted
    generated = metric(mono, "afd:generation_tokens_total") - tokens_before
    assert 3 <= generated < 400, generated
    time.sleep(0.5)
    assert metric(mono, "afd:generation_tokens_total") - tokens_before == generated  # nothing more ran
    assert metric(mono, 'afd:requests_finished_total{finish_reason="abort"}') == aborted_before + 1


def test_a_client_gone_before_admission_is_aborted(shipped_model, tmp_path):
    """One KV slot, held by a long request: a second request waits for it; its client hangs up
    before it is admitted. It must never run (it did, to max_tokens, when aborts needed the engine
    to have admitted the request first)."""
    import threading

    server = start_monolithic(shipped_model, tmp_path, name="preadmit", extra=["--max-num-seqs", "1"])
    try:
        server.wait_ready(120)
        long = {"prompt": ODD, "max_tokens": 300, "ignore_eos": True, "temperature": 0}
        holder = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/completions", json=long, timeout=120))
        holder.start()
        wait_metric(server, "afd:num_requests_running", 1)
        with httpx.Client(timeout=60) as client:
            body = {"prompt": ODD, "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
            with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                wait_metric(server, "afd:num_requests_waiting", 1)
        holder.join(120)  # the connection closed above, while the request still waited
        time.sleep(1.0)
        assert metric(server, "afd:generation_tokens_total") == 300  # the long request's, no more
        assert metric(server, "afd:num_requests_waiting") == 0 and metric(server, "afd:num_requests_running") == 0
    finally:
        server.stop()


@pytest.mark.parametrize("path,prompt", [("/v1/chat/completions", {"messages": [{"role": "user", "content": ODD}]}),
                                         ("/v1/completions", {"prompt": ODD})], ids=["chat", "completions"])
def test_non_streaming_disconnect_aborts_request(mono, path, prompt):
    """Oracle: two choices that would run for 500 tokens each (ignore_eos, seconds here) are
    aborted once their non-streaming client gives up after 0.3 s: generation stops far short of
    1000 tokens, every KV cache slot is free again and nothing runs; then the server answers the
    seed question exactly."""
    tokens_before = metric(mono, "afd:generation_tokens_total")
    body = {"model": mono.model, **prompt, "max_tokens": 500, "ignore_eos": True, "temperature": 0, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        post(mono, path, body, timeout=0.3)  # the client's connection closes with it
    wait_metric(mono, "afd:num_requests_running", 0, timeout_s=5)
    wait_metric(mono, "afd:kv_cache_usage_perc", 0, timeout_s=5)
    generated = metric(mono, "afd:generation_tokens_total") - tokens_before
    assert 0 < generated < 800, generated
    time.sleep(0.5)
    assert metric(mono, "afd:generation_tokens_total") - tokens_before == generated  # nothing more ran
    assert chat(mono, ODD, temperature=0).json()["choices"][0]["message"]["content"] == ODD_ANSWER


# ---------------------------------------------------------------- 7. metrics and OpenAPI


def _histogram_count(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}_count{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}_count{labels} not in /metrics"
    return float(m.group(1))


def test_metrics_histograms(mono):
    """Oracle: after a finished multi-token request, each latency histogram has observations."""
    assert chat(mono, ODD, temperature=0).status_code == 200
    text = httpx.get(f"{mono.url}/metrics", timeout=10).text
    for name in ("afd:time_to_first_token_seconds", "afd:time_per_output_token_seconds",
                 "afd:e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert _histogram_count(text, name) >= 1
    assert "afd:connector_wait_seconds_count" not in text  # monolithic: no connector


def test_metrics_connector_wait_per_layer(afd):
    """Oracle: in AFD mode the attention rank waits on the FFN once per layer (4 in the shipped model)."""
    r = chat(afd, ODD, temperature=0)
    assert r.status_code == 200
    text = httpx.get(f"{afd.url}/metrics", timeout=10).text
    assert "# TYPE afd:connector_wait_seconds histogram" in text
    layers = set(re.findall(r'^afd:connector_wait_seconds_count\{layer="(\d+)"\}', text, re.M))
    assert layers == {"0", "1", "2", "3"}
    assert all(_histogram_count(text, "afd:connector_wait_seconds", f'{{layer="{x}"}}') >= 1 for x in layers)
    assert _histogram_count(text, "afd:time_to_first_token_seconds") >= 1


def test_openapi_lists_the_endpoints(mono):
    """Oracle: FastAPI publishes the routes and request schemas in /openapi.json."""
    spec = httpx.get(f"{mono.url}/openapi.json", timeout=10).json()
    assert "post" in spec["paths"]["/v1/chat/completions"]
    assert "post" in spec["paths"]["/v1/completions"]
    assert "get" in spec["paths"]["/v1/models"]
    schemas = spec["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ErrorResponse"} <= set(schemas)


def test_sigterm_lets_running_requests_finish(shipped_model, tmp_path):
    """Graceful shutdown: after SIGTERM the server accepts nothing new, a stream already running
    completes with its finish reason, and the process exits on its own."""
    import signal
    import threading

    server = start_monolithic(shipped_model, tmp_path, name="sigterm")
    proc = server.server.proc
    try:
        server.wait_ready(120)
        finish = []
        started = threading.Event()

        def stream():
            body = {"messages": [{"role": "user", "content": "1 3 5"}], "max_tokens": 200, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        started.set()
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            finish.append(chunk["choices"][0]["finish_reason"])

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        core = engine_core_pid(proc.pid)
        assert finish == ["length"]
        assert proc.wait(40) == 0
        assert not Path(f"/proc/{core}").exists() or "zombie" in Path(f"/proc/{core}/status").read_text()
        log = server.server.stderr()
        assert " ERROR " not in log and "Traceback" not in log, log[-3000:]  # a planned stop reads as one
        assert "start-up: ready in" in log and "Application startup complete." in log
    finally:
        server.stop()


def engine_core_pid(server_pid: int) -> int:
    """The engine core process `afd serve` started (its child running engine_core.run)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    cores = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, children
    return cores[0]


def test_a_dead_engine_core_is_a_503_not_a_hang(shipped_model, tmp_path):
    """The engine runs in its own process: killed mid-stream, the stream ends with an error
    event, /health and new requests answer 503 within seconds, and the API process stays up."""
    import threading

    server = start_monolithic(shipped_model, tmp_path, name="deadcore")
    try:
        server.wait_ready(120)
        events, started = [], threading.Event()

        def stream():
            body = {"prompt": "1 3 5", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        os.kill(engine_core_pid(server.server.pid), signal.SIGKILL)
        t.join(10)
        assert not t.is_alive() and "engine core process exited" in events[-2] and events[-1] == "[DONE]"
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and "engine core process exited" in health.text
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "1", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and server.server.proc.poll() is None
    finally:
        server.stop()


@contextlib.contextmanager
def running(d, n: int = 3, max_tokens: int = 64):
    """n streamed chat requests running on d for the block (closed, so aborted, when it ends)."""
    started, stop = threading.Event(), threading.Event()

    def one() -> None:
        body = {"messages": [{"role": "user", "content": ODD}], "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{d.url}/v1/chat/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        load = [pool.submit(one) for _ in range(n)]
        try:
            assert started.wait(30), [f.exception() for f in load if f.done()]
            yield
        finally:
            stop.set()


def test_live_trace_of_the_running_afd_deployment(afd, mono):
    """POST /debug/trace records the next steps of every rank while requests run; the answer is
    Chrome trace JSON with attention and FFN spans of exactly the steps asked for, per layer."""
    with running(afd):
        r = post(afd, "/debug/trace", {"steps": 3, "timeout": 30}, timeout=60)
    assert r.status_code == 200, r.text
    spans = [e for e in r.json()["traceEvents"] if e["ph"] == "X"]
    by_rank = {(e["cat"], e["name"]) for e in spans}
    assert {("attention", "attention"), ("attention", "wait"), ("ffn", "ffn"), ("ffn", "wait")} <= by_rank
    steps = {e["args"]["step"] for e in spans}
    assert len({e["args"]["step"] for e in spans if e["args"]["phase"] == "decode"}) == 3
    assert {e["args"]["step"] for e in spans if e["cat"] == "ffn"} <= steps
    assert {e["args"]["layer"] for e in spans if e["name"] == "ffn"} == set(range(4))
    assert_error(post(mono, "/debug/trace", {"steps": 3}), 400, contains=("monolithic",))


def test_overlapping_trace_calls_each_get_an_answer(afd):
    """A second POST /debug/trace while one records shares that recording: both answer."""
    with running(afd), concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, afd, "/debug/trace", {"steps": 4, "timeout": 20}, timeout=60)
        time.sleep(0.05)
        second = pool.submit(post, afd, "/debug/trace", {"steps": 2, "timeout": 20}, timeout=60)
        answers = [first.result(), second.result()]
    assert [r.status_code for r in answers] == [200, 200]
    assert all(any(e["ph"] == "X" for e in r.json()["traceEvents"]) for r in answers)


def test_trace_with_nothing_running_is_409_at_once(afd):
    """Nothing to record: a clear 409 at once, not an empty 200 after the timeout."""
    wait_metric(afd, "afd:num_requests_running", 0)
    start = time.monotonic()
    err = assert_error(post(afd, "/debug/trace", {"steps": 3, "timeout": 30}, timeout=60), 409,
                       contains=("no request is running",))
    assert err["type"] == "conflict"
    assert time.monotonic() - start < 5


def test_no_decode_step_compiles_after_health_is_ready(tiny_greedy_checkpoint, tmp_path):
    """`afd serve` compiled (its default warm-up): requests that arrive together after /health is
    ready, ramping the batch through every bucket and their contexts past 64 positions, build no
    graph (dynamo's count, as /metrics shows it, is the same before and after)."""
    from afd_compile.roles.rendezvous import free_port
    from tests.server_fixtures import Deployment, Proc

    port = free_port()
    args = ["serve", "--model", str(tiny_greedy_checkpoint), "--max-num-seqs", "4", "--max-model-len", "128",
            "--port", str(port)]
    server = Deployment("warm", port, [Proc("warm", args, tmp_path)], str(tiny_greedy_checkpoint))

    def compiled_graphs() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return float(re.search(r"^afd:compiled_graphs (\S+)$", text, re.M).group(1))

    async def requests():
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [{"model": server.model, "prompt": " ".join(map(str, range(n))), "max_tokens": m,
                       "temperature": 0, "ignore_eos": True} for n, m in ((1, 3), (30, 50), (5, 70), (12, 20), (2, 8))]
            return await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=b) for b in bodies))

    try:
        server.wait_ready(timeout_s=300)
        ready = compiled_graphs()
        assert ready >= 3  # batch buckets 1, 2, 4
        assert all(r.status_code == 200 for r in asyncio.run(requests()))
        assert compiled_graphs() == ready
    finally:
        server.stop()
