"""LLMEngine end to end on a tiny random checkpoint (eager), plus the `afd` CLI.

Oracles: the engine's own greedy continuation of a prompt run alone in a fresh engine (batching,
KV-slot reuse and chunked prefill must not change greedy tokens), hand-built chat-template token
ids, and the vLLM rules for finish reasons.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams
from afd_compile.errors import AfdError
from afd_compile.model.loader import load_model

GREEDY = dict(temperature=0.0)
PROMPTS = ["1 2 3", "5 6 7 8 9", "10 20 30 40 50 60 70 80 90 100 110", "999", "4 4 4 4 4 4"]


def make_engine(ckpt, **kw) -> LLMEngine:
    kw.setdefault("max_num_seqs", 4)
    return LLMEngine(EngineConfig(model=ckpt, enforce_eager=True, **kw))


@pytest.fixture(scope="module")
def engine(tiny_greedy_checkpoint) -> LLMEngine:
    return make_engine(tiny_greedy_checkpoint)


@pytest.fixture(scope="module")
def alone(tiny_greedy_checkpoint):
    """Greedy continuation (20 tokens, EOS ignored) of each prompt, each run alone in its own engine."""
    out = {}
    for p in PROMPTS:
        c = make_engine(tiny_greedy_checkpoint, max_num_seqs=1).generate(
            [p], SamplingParams(**GREEDY, max_tokens=20, ignore_eos=True))[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 20
        out[p] = c
    return out


def first_new(tokens: list[int]) -> int:
    """Index of a token that does not occur earlier in `tokens` (other than the first)."""
    return next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.scheduler.has_work()
    assert not engine.requests
    blocks = engine.scheduler.block_manager
    assert blocks.num_free == blocks.num_blocks and blocks.usage() == 0.0


# ---------------------------------------------------------------- finishing


def test_max_tokens_finishes_with_length(engine, alone):
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=7, ignore_eos=True))[0]
    assert c.finish_reason == "length"
    assert c.token_ids == alone["1 2 3"].token_ids[:7]
    assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert_idle(engine)


def stop_index(engine: LLMEngine, tokens: list[int], stop: str) -> int:
    """Index of the token whose decoding first makes the text contain `stop`."""
    return next(k for k in range(len(tokens))
                if stop in engine.tokenizer.decode(tokens[: k + 1], skip_special_tokens=True))


def test_stop_string_truncates_text(engine, alone):
    ref = alone["1 2 3"]
    words = ref.text.split()
    for stop in (words[3], f"{words[3]} {words[4]}"):  # one token; two tokens
        k = stop_index(engine, ref.token_ids, stop)
        c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=20, stop=["not-in-the-text", stop]))[0]
        assert c.finish_reason == "stop"
        assert c.text == ref.text[: ref.text.find(stop)]
        assert stop not in c.text and c.text
        assert c.token_ids == ref.token_ids[: k + 1]  # generation ended at the token completing the stop string
    assert_idle(engine)


def test_stop_string_in_the_last_allowed_token_reports_stop(engine, alone):
    """As in vLLM, a matched stop string wins over max_tokens on the same token."""
    ref = alone["1 2 3"]
    stop = ref.text.split()[3]
    k = stop_index(engine, ref.token_ids, stop)
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=k + 1, stop=stop))[0]
    assert c.text == ref.text[: ref.text.find(stop)]
    assert c.finish_reason == "stop"


def test_stop_token_ids(engine, alone):
    ref = alone["5 6 7 8 9"].token_ids
    i = first_new(ref)
    c = engine.generate(["5 6 7 8 9"], SamplingParams(**GREEDY, max_tokens=20, stop_token_ids=[ref[i]],
                                                      ignore_eos=True))[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == ref[: i + 1]


def test_context_full_finishes_with_length(tiny_greedy_checkpoint, alone):
    engine = make_engine(tiny_greedy_checkpoint, max_model_len=8)
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=100))[0]
    assert c.finish_reason == "length"
    assert len(c.prompt_token_ids) + len(c.token_ids) == 8
    assert c.token_ids == alone["1 2 3"].token_ids[: 8 - len(c.prompt_token_ids)]
    assert_idle(engine)


def test_eos_stops_unless_ignore_eos(tiny_greedy_checkpoint, alone):
    # Make the tokenizer's EOS the greedy choice after "1 2 3": give its lm_head row twice the
    # row of the token the model would pick, whose logit is positive.
    model = load_model(tiny_greedy_checkpoint)
    eos = model.cfg.eos_token_id
    first = alone["1 2 3"].token_ids[0]
    model.lm_head.weight[eos] = 2 * model.lm_head.weight[first]
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_num_seqs=2), model=model)
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=10))[0]
    assert (c.token_ids, c.text, c.finish_reason) == ([eos], "", "stop")
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=4, ignore_eos=True))[0]
    assert c.token_ids[0] == eos and len(c.token_ids) == 4 and c.finish_reason == "length"


def test_config_eos_token_id_stops_too(tiny_greedy_checkpoint, alone):
    ref = alone["1 2 3"].token_ids
    i = first_new(ref)
    model = load_model(tiny_greedy_checkpoint)
    model.cfg.eos_token_id = [ref[i], model.cfg.eos_token_id]  # a list, as some checkpoints have
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_num_seqs=2), model=model)
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=20))[0]
    assert (c.token_ids, c.finish_reason) == (ref[: i + 1], "stop")
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=20, ignore_eos=True))[0]
    assert (c.token_ids, c.finish_reason) == (ref, "length")


# ---------------------------------------------------------------- bad requests


def test_prompt_longer_than_context(tiny_greedy_checkpoint):
    engine = make_engine(tiny_greedy_checkpoint, max_model_len=8)
    with pytest.raises(AfdError, match=r"\b12\b.*\b8\b"):  # 11 numbers and bos
        engine.add_request(" ".join(str(n) for n in range(11)))
    # Prompt plus one generated token must fit: 8 tokens in an 8-token context is too long.
    with pytest.raises(AfdError, match=r"\b8\b"):
        engine.add_request(list(range(10, 18)))
    assert engine.add_request(list(range(10, 17))) is not None  # 7 fits


def test_empty_prompt(engine):
    with pytest.raises(AfdError, match="empty"):
        engine.add_request([])
    with pytest.raises(AfdError, match="empty"):
        engine.add_request("")
    with pytest.raises(AfdError, match="empty"):  # bos alone: no token of its own
        engine.add_request("  ")
    assert_idle(engine)


@pytest.mark.parametrize("ids", [[5, 1007], [-1, 5], [10**6]])
def test_token_ids_out_of_vocab(engine, ids):
    with pytest.raises(AfdError, match="1007"):
        engine.add_request(ids)
    assert_idle(engine)


def test_failed_generate_leaves_no_work_behind(tiny_greedy_checkpoint, alone):
    engine = make_engine(tiny_greedy_checkpoint, max_model_len=16)
    with pytest.raises(AfdError):
        engine.generate(["1 2 3", " ".join(["7"] * 20)], SamplingParams(**GREEDY))
    assert_idle(engine)
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=5, ignore_eos=True))
    assert len(c) == 1 and c[0].token_ids == alone["1 2 3"].token_ids[:5]


def test_generate_params_list_must_match_prompts(engine):
    with pytest.raises(AfdError, match=r"3 prompts but 2"):
        engine.generate(["1", "2", "3"], [SamplingParams(**GREEDY), SamplingParams(**GREEDY)])
    assert_idle(engine)


# ---------------------------------------------------------------- batching


def test_more_requests_than_slots_match_each_request_alone(tiny_greedy_checkpoint, alone):
    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=2)
    # Different lengths: requests finish at different steps, so admissions interleave with decodes
    # and freed slots are reused while other requests are mid-generation.
    max_tokens = [20, 6, 13, 3, 17]
    params = [SamplingParams(**GREEDY, max_tokens=m, ignore_eos=True) for m in max_tokens]
    out = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in out] == [alone[p].token_ids[:m] for p, m in zip(PROMPTS, max_tokens)]
    assert [c.finish_reason for c in out] == ["length"] * 5
    assert len({c.request_id for c in out}) == 5
    assert_idle(engine)
    # Same prompts, all in one batch with room for all: identical again.
    out = make_engine(tiny_greedy_checkpoint, max_num_seqs=8).generate(
        PROMPTS, SamplingParams(**GREEDY, max_tokens=20, ignore_eos=True))
    assert [c.token_ids for c in out] == [alone[p].token_ids for p in PROMPTS]


@pytest.mark.parametrize("budget", [1, 4, 7])
def test_chunked_prefill_matches_unchunked(tiny_greedy_checkpoint, alone, budget):
    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=3, max_num_batched_tokens=budget)
    prompts = PROMPTS[1:4]  # 5, 11 and 1 tokens
    out = engine.generate(prompts, SamplingParams(**GREEDY, max_tokens=8, ignore_eos=True))
    assert [c.token_ids for c in out] == [alone[p].token_ids[:8] for p in prompts]
    assert_idle(engine)


def test_seeded_sampling_is_independent_of_the_batch(tiny_greedy_checkpoint):
    sampled = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    alone = make_engine(tiny_greedy_checkpoint, seed=1).generate(["1 2 3"], sampled)[0]
    other = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True)
    crowd = make_engine(tiny_greedy_checkpoint, seed=2).generate(["4 5", "1 2 3", "6"], [other, sampled, other])
    assert crowd[1].token_ids == alone.token_ids
    unseeded = make_engine(tiny_greedy_checkpoint).generate(["1 2 3"], SamplingParams(temperature=1.0, max_tokens=12,
                                                                                      ignore_eos=True))[0]
    assert unseeded.token_ids != alone.token_ids


def test_abort_frees_the_blocks(tiny_greedy_checkpoint, alone):
    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=1)
    running = engine.add_request("1 2 3", SamplingParams(**GREEDY, max_tokens=50))
    waiting = engine.add_request("999", SamplingParams(**GREEDY, max_tokens=50))
    engine.step()
    engine.step()
    assert running.block_table and len(running.output_token_ids) == 2
    assert len(engine.scheduler.running) == 1 and engine.scheduler.waiting  # max_num_seqs 1
    engine.abort(running.request_id)
    engine.abort(waiting.request_id)
    engine.abort("no-such-request")  # ignored
    assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort")
    assert not running.block_table
    assert_idle(engine)
    assert engine.step() == []
    # The freed blocks serve a new request, whose output is unaffected by the aborted one's cache.
    c = engine.generate(["5 6 7 8 9"], SamplingParams(**GREEDY, max_tokens=10, ignore_eos=True))[0]
    assert c.token_ids == alone["5 6 7 8 9"].token_ids[:10]
    assert_idle(engine)


def test_logprobs_through_the_engine(engine):
    c = engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=4, logprobs=2, ignore_eos=True))[0]
    assert len(c.logprobs) == 4
    for token, lp in zip(c.token_ids, c.logprobs):
        assert lp["top"][0][0] == token  # greedy picks the most likely token
        assert lp["logprob"] == pytest.approx(lp["top"][0][1]) and lp["logprob"] <= 0
        assert lp["top"][0][1] >= lp["top"][1][1]
    assert engine.generate(["1 2 3"], SamplingParams(**GREEDY, max_tokens=2))[0].logprobs is None


# ---------------------------------------------------------------- chat template


def test_encode_chat_uses_the_shipped_template(engine):
    tok = engine.tokenizer
    bos, user, assistant, eos = tok.convert_tokens_to_ids(["<|bos|>", "<|user|>", "<|assistant|>", "<|eos|>"])
    n = tok.convert_tokens_to_ids
    assert engine.encode_chat([{"role": "user", "content": "1 2 3"}]) == [bos, user, *n(["1", "2", "3"]), assistant]
    messages = [{"role": "system", "content": "7"}, {"role": "user", "content": "1 2"},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "4"}]
    system = tok.convert_tokens_to_ids("<|system|>")
    assert engine.encode_chat(messages) == [bos, system, n("7"), user, *n(["1", "2"]), assistant, n("3"), eos, user,
                                            n("4"), assistant]
    ids = engine.encode_chat(messages)
    c = engine.generate([ids], SamplingParams(**GREEDY, max_tokens=3, ignore_eos=True))[0]
    assert c.prompt_token_ids == ids and len(c.token_ids) == 3


def test_encode_chat_without_template(tiny_greedy_checkpoint):
    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=1)
    engine.tokenizer.chat_template = None
    with pytest.raises(AfdError, match="chat template"):
        engine.encode_chat([{"role": "user", "content": "1"}])


# ---------------------------------------------------------------- CLI


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "afd_compile.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_generate_prints_one_line_per_prompt(tiny_greedy_checkpoint, engine, alone):
    prompts = ["1 2 3", "5 6 7 8 9", "999"]
    r = run_cli("generate", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--max-tokens", "5", *prompts)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == len(prompts) + 1, r.stdout  # exactly one line per prompt
    # Greedy by default, so each line is the prompt's own greedy continuation (EOS does not come).
    assert not any(engine.tokenizer.eos_token_id in alone[p].token_ids[:5] for p in prompts)
    assert lines[:-1] == [engine.tokenizer.decode(alone[p].token_ids[:5], skip_special_tokens=True) for p in prompts]


def test_cli_generate_reports_errors_in_one_line(tiny_greedy_checkpoint):
    r = run_cli("generate", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--max-model-len", "4",
                "1 2 3 4 5 6")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("afd: error: the prompt has 7 tokens")  # bos first


def test_cli_chat_two_turns_then_eof(tiny_greedy_checkpoint):
    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=1)
    params = SamplingParams(**GREEDY, max_tokens=5)
    messages, replies = [], []
    for turn in ("1 2 3", "4 5"):
        messages.append({"role": "user", "content": turn})
        reply = engine.generate([engine.encode_chat(messages)], params)[0].text
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.strip()})
    assert all(replies)
    r = run_cli("chat", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--max-tokens", "5",
                stdin="1 2 3\n4 5\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"> {replies[0]}\n> {replies[1]}\n> "


def test_cli_chat_commands_and_single_turn(tiny_greedy_checkpoint, shipped_model):
    """/help and an unknown command go to stderr, never to the model; /reset starts over; /exit
    quits; --single-turn sends each message alone (the shipped model says so itself)."""
    from afd_compile.model.loader import single_turn

    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=1)
    params = SamplingParams(**GREEDY, max_tokens=5)
    alone = {t: engine.generate([engine.encode_chat([{"role": "user", "content": t}])], params)[0].text
             for t in ("1 2 3", "4 5")}
    r = run_cli("chat", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--max-tokens", "5",
                stdin="1 2 3\n/help\n/nope\n/reset\n4 5\n/exit\n7 8\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"> {alone['1 2 3']}\n> > > > {alone['4 5']}\n> "
    assert "/reset" in r.stderr and "unknown command /nope" in r.stderr and "conversation cleared" in r.stderr
    r = run_cli("chat", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--max-tokens", "5",
                "--single-turn", stdin="1 2 3\n4 5\n")
    assert r.stdout == f"> {alone['1 2 3']}\n> {alone['4 5']}\n> "
    assert single_turn(shipped_model) and not single_turn(tiny_greedy_checkpoint)


def test_cli_chat_streaming_never_shows_text_past_a_stop_string(tiny_greedy_checkpoint):
    engine = make_engine(tiny_greedy_checkpoint, max_num_seqs=1)
    ids = engine.encode_chat([{"role": "user", "content": "1 2 3"}])
    full = engine.generate([ids], SamplingParams(**GREEDY, max_tokens=6))[0]
    words = full.text.split()
    stop = f"{words[2]} {words[3]}"  # spans two tokens: the first is decoded a step before the match
    expect = full.text[: full.text.find(stop)]
    r = run_cli("chat", "--model", str(tiny_greedy_checkpoint), "--enforce-eager", "--max-tokens", "6", "--stop", stop,
                stdin="1 2 3\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"> {expect}\n> "
