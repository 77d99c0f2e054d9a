"""Bad input never hurts the server: whatever a client sends, the answer is below 500, errors
come in OpenAI's error schema, and the server stays healthy and exact for the next request.

Three layers, each driven by generated input with a bounded number of examples:
  sampler   SamplingParams with NaN, inf, negative, huge and wrong-typed values either refuse
            with an AfdError naming the field, or sample a valid token (no exception, no NaN)
  template  the chat template over odd roles, empty and non-ASCII content
  server    schemathesis over /openapi.json, and hypothesis bodies aimed at the sampler fields
            and the chat messages, against a real `afd serve` (the shipped model, eager)
Bodies over the 1 MiB limit (413) are covered by tests/test_server.py::test_body_over_1mib_413.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from afd_compile.engine.sampler import Sampler
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.sequence import Sequence
from afd_compile.errors import AfdError
from tests.server_fixtures import start_monolithic

pytestmark = pytest.mark.timeout(600)

ODD, ODD_ANSWER = "1 3 5 7 9", "11 13 15 17 19 21 23 25"
VOCAB = 12
SAMPLER_FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs"]
# Each example talks to a live server over loopback: no per-example deadline, few examples.
SERVER = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
UNIT = settings(max_examples=150, deadline=None, derandomize=True)

nasty_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 5e-324, -5e-324, 1e-30, 1e308, -1e308, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
wrong_types = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
nasty_values = st.one_of(nasty_numbers, wrong_types, st.lists(st.one_of(nasty_numbers, st.text(max_size=3)),
                                                              max_size=3))


def sample_once(params: SamplingParams, logits: torch.Tensor, output: list[int]) -> list[int]:
    seq = Sequence([1, 2, 3], params)
    seq.output_token_ids = list(output)
    batch = [seq, Sequence([4], SamplingParams(temperature=0.7))]  # a neighbour the bad row must not hurt
    out = Sampler(0)(logits, batch)
    assert all(0 <= t < VOCAB for t in out.token_ids), out.token_ids
    if params.logprobs is not None:
        assert not math.isnan(out.logprobs[0]["logprob"])
    return out.token_ids


# ---------------------------------------------------------------- sampler


@UNIT
@given(st.dictionaries(st.sampled_from(SAMPLER_FIELDS), nasty_values, max_size=4))
def test_sampling_params_refuse_naming_the_field_or_sample(kwargs):
    """Oracle: NaN, inf, negative, huge or wrong-typed values either raise AfdError naming one of
    the fields given, or build params that sample a token in the vocabulary."""
    try:
        params = SamplingParams(**kwargs)
    except AfdError as e:
        assert any(str(e).startswith(f"{name}=") for name in kwargs), (kwargs, str(e))
        return
    sample_once(params, torch.randn(2, VOCAB), [5, 5, 7])


extreme_valid = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), st.floats(min_value=1e-5, max_value=1e308)),
    "top_p": st.floats(min_value=5e-324, max_value=1.0),
    "top_k": st.one_of(st.integers(min_value=-1, max_value=VOCAB + 1), st.just(2**70)),
    "min_p": st.floats(min_value=0.0, max_value=1.0),
    "repetition_penalty": st.floats(min_value=5e-324, max_value=1e308),
    "presence_penalty": st.floats(min_value=-2.0, max_value=2.0),
    "frequency_penalty": st.floats(min_value=-2.0, max_value=2.0),
    "seed": st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64 - 1)),
    "logprobs": st.one_of(st.none(), st.integers(min_value=0, max_value=VOCAB)),
})
F32_MAX = torch.finfo(torch.float32).max
huge_logits = st.lists(st.floats(min_value=-F32_MAX, max_value=F32_MAX, width=32), min_size=VOCAB, max_size=VOCAB)


@UNIT
@given(extreme_valid, huge_logits)
def test_every_valid_sampling_params_sample_a_token(kwargs, logits):
    """Oracle: a repetition_penalty of 5e-324 or a temperature of 1e-5 over logits near the float32
    limit once made softmax NaN and killed the engine loop for every request: whatever valid
    params and finite logits, the sampler returns a token in the vocabulary."""
    row = torch.tensor(logits)
    sample_once(SamplingParams(**kwargs), torch.stack([row, row.flip(0)]), [3, 3, 11])


# ---------------------------------------------------------------- chat template

odd_roles = st.one_of(st.sampled_from(["system", "user", "assistant"]),
                      st.sampled_from(["tool", "developer", "function", "", "USER", "<|eos|>"]), st.text(max_size=8))
unicode = st.one_of(st.just(""), st.text(max_size=40), st.sampled_from(["1 3 5 7 9", "∑ 🙂 中文 \x00", "<|eos|> 1",
                                                                          "{{ bos_token }}", "{% if %}"]))
# JSON can carry a lone surrogate ("\ud800") that no UTF-8 text holds: the tokenizer raised a
# TypeError on it (a 500) until the API refused it.
surrogate = st.builds("".join, st.lists(st.one_of(st.characters(categories=["Cs"]), st.text(max_size=3)), min_size=1,
                                        max_size=4)).filter(lambda t: any("\ud800" <= c <= "\udfff" for c in t))
messages = st.lists(st.fixed_dictionaries({"role": odd_roles, "content": unicode}), min_size=1, max_size=4)
wire_messages = st.lists(st.fixed_dictionaries({"role": odd_roles, "content": st.one_of(unicode, surrogate)}),
                         min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tokenizer(shipped_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages)
def test_chat_template_renders_any_messages(tokenizer, msgs):
    """Oracle: the template renders every role and content to ids inside the vocabulary, starts with
    <|bos|>, ends with the generation prompt <|assistant|>, and never evaluates content as Jinja."""
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(0 <= i < len(tokenizer) for i in ids)
    bos_in_content = sum(m["content"].count("<|bos|>") for m in msgs)
    assert ids.count(tokenizer.bos_token_id) == 1 + bos_in_content  # "{{ bos_token }}" stays text


# ---------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(shipped_model, tmp_path_factory):
    d = start_monolithic(shipped_model, tmp_path_factory.mktemp("bad-input-logs"), "bad-input")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def assert_error_schema(r: httpx.Response) -> None:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == r.status_code and body["error"]["message"], body
    assert "Traceback" not in body["error"]["message"], body


def assert_still_serving(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": ODD}],
                                                              "temperature": 0}, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == ODD_ANSWER


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_operations_never_5xx(server, mode):
    """Oracle: schemathesis's checks over every operation in /openapi.json, with bodies that fit the
    published schema (positive) and bodies that break it (negative): no 5xx, status codes and
    content types as documented, schema-violating bodies refused, errors in OpenAI's schema.
    Schema-valid bodies may still be refused for what a schema cannot say (prompt plus max_tokens
    over the context, token ids past the vocabulary, /debug/trace on a monolithic server).
    (schemathesis's own pytest plugin does not run under pytest 9, hence the strategy with @given.)"""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(schema.as_strategy(GenerationMode(mode)))
    def check(case):
        r = case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
        if r.status_code >= 400:
            assert_error_schema(r)

    check()
    assert_still_serving(server)


def post_raw(server, path: str, body) -> httpx.Response:
    """json.dumps(allow_nan=True): NaN and Infinity go out as the bare words some clients send."""
    return httpx.post(f"{server.url}{path}", content=json.dumps(body, allow_nan=True),
                      headers={"Content-Type": "application/json"}, timeout=60)


@SERVER
@given(st.dictionaries(st.sampled_from(SAMPLER_FIELDS + ["n", "top_logprobs", "max_completion_tokens"]),
                       nasty_values, min_size=1, max_size=3), st.booleans())
def test_sampler_fields_in_requests_400_or_200(server, fields, stream):
    """Oracle: NaN, inf, huge, negative and wrong-typed sampler fields in a chat request answer 200
    (a valid value) or 400 in the error schema naming the field; never 5xx or a broken stream."""
    body = {"messages": [{"role": "user", "content": ODD}], "max_tokens": 2, "stream": stream, **fields}
    r = post_raw(server, "/v1/chat/completions", body)
    assert r.status_code in (200, 400), (fields, r.status_code, r.text)
    if r.status_code == 400:
        assert_error_schema(r)
        assert any(f in r.text for f in fields), (fields, r.text)
    elif stream:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


@SERVER
@given(wire_messages)
def test_chat_messages_400_or_200(server, msgs):
    """Oracle: system/user/assistant messages with any Unicode content (empty, non-ASCII,
    special-token text, Jinja syntax) answer 200; any other role, or a lone surrogate, is a 400
    naming `messages`."""
    r = post_raw(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    if all(m["role"] in ("system", "user", "assistant") and not has_surrogate(m["content"]) for m in msgs):
        assert r.status_code == 200, (msgs, r.text)
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
    else:
        assert r.status_code == 400, (msgs, r.text)
        assert_error_schema(r)
        assert r.json()["error"]["param"].startswith("messages")


@SERVER
@given(st.one_of(st.text(max_size=8), surrogate, st.lists(st.one_of(st.text(max_size=4), surrogate), min_size=1,
                                                          max_size=3)))
def test_completion_prompt_text_400_or_200(server, prompt):
    """Oracle: a text prompt (or a list of them) answers 200, or 400 naming `prompt` when it is empty or
    holds a lone surrogate."""
    r = post_raw(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    texts = [prompt] if isinstance(prompt, str) else prompt
    if any(has_surrogate(t) for t in texts) or not all(t.split() for t in texts):
        assert r.status_code == 400, (prompt, r.text)
        assert_error_schema(r)
        assert r.json()["error"]["param"] == "prompt", r.text
    else:
        assert r.status_code == 200, (prompt, r.text)


def test_one_small_body_cannot_queue_thousands_of_sequences(server):
    """Oracle: 3000 one-token prompts with n=16 are a 15 KB body but 48,000 sequences, which kept
    every other client waiting for minutes: at most 256 completions per request (400 beyond)."""
    flood = {"prompt": [[5]] * 3000, "n": 16, "max_tokens": 4}
    r = post_raw(server, "/v1/completions", flood)
    assert r.status_code == 400 and "256" in r.json()["error"]["message"], r.text
    assert_error_schema(r)
    r = post_raw(server, "/v1/completions", {"prompt": [[5]] * 16, "n": 16, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 256
    assert post_raw(server, "/v1/completions", {"prompt": [[5]] * 17, "n": 16, "max_tokens": 1}).status_code == 400


def test_server_healthy_and_exact_after_the_fuzzing(server):
    """Oracle: after everything above, /health is 200, every KV slot is free, and greedy decoding
    still gives the shipped model's answer."""
    assert_still_serving(server)
    assert server.metric("afd:kv_cache_usage_perc") == 0
