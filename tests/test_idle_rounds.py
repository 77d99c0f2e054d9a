"""Idle rounds: an FFN rank acks idle attention peers at once, flagging a round in which no rank
had work; only then does an idle attention rank wait (for a request) before its next round.
So a request that arrives while the deployment idles starts at once, a busy peer is never held
up by an idle one, and an idle deployment does not spin."""

from __future__ import annotations

import asyncio
import collections
import queue
import time
from types import SimpleNamespace

import torch

from afd_compile.config import EngineConfig
from afd_compile.connector.base import AFDConnector, Flag, Kind, StepHeader
from afd_compile.engine.llm_engine import LLMEngine
from afd_compile.engine.rank import Rank
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.model.loader import load_model
from afd_compile.roles.ffn import FFNWorker
from afd_compile.serve import async_engine
from afd_compile.serve.async_engine import IDLE_WAIT_S, AsyncEngine
from afd_compile.topology import Topology


class ScriptedPeers(AFDConnector):
    """The FFN side of links to attention peers that send scripted headers (and ones as hidden
    states); records how the FFN rank waited for each header and what it sent back."""

    def __init__(self, headers: dict[int, list[StepHeader]], hidden: int):
        self.headers = {p: collections.deque(h) for p, h in headers.items()}
        self.hidden = hidden
        self.waits: list[tuple[int, bool]] = []  # (peer, patient) of each recv_step
        self.acks: list[tuple[int, Kind, Flag]] = []
        self.outputs: list[tuple[int, int]] = []  # (peer, rows) of each FFN output

    def recv_step(self, peer, patient=False):
        self.waits.append((peer, patient))
        return self.headers[peer].popleft()

    def recv_attn_output(self, peer, tokens, micro_batch):
        return torch.ones(tokens, self.hidden)

    def send_ffn_output(self, peer, hidden, micro_batch):
        self.outputs.append((peer, hidden.shape[0]))

    def send_ack(self, peer, kind=Kind.ACK, flags=Flag(0)):
        self.acks.append((peer, kind, flags))

    # the attention side: not this rank's
    def send_step(self, header):
        raise NotImplementedError

    def send_attn_output(self, hidden, micro_batch):
        raise NotImplementedError

    def recv_ffn_output(self, micro_batch):
        raise NotImplementedError

    def recv_reply(self):
        raise NotImplementedError


def test_ffn_rank_flags_rounds_without_work_and_only_then_waits_patiently(tiny_greedy_checkpoint):
    idle, bye = StepHeader(Kind.IDLE), StepHeader(Kind.SHUTDOWN)
    step = StepHeader(Kind.STEP, step=1, tokens=(3,))  # a prefill round of 3 tokens from peer 0
    model = load_model(tiny_greedy_checkpoint, part="ffn")
    peers = ScriptedPeers({0: [idle, step, idle, bye], 1: [idle, idle, idle, bye]}, model.cfg.hidden_size)
    world = SimpleNamespace(topology=Topology.parse("2A1F"), rank=0, global_rank=2)
    FFNWorker(model, world, peers).run()

    assert peers.acks == [(0, Kind.ACK, Flag.IDLE), (1, Kind.ACK, Flag.IDLE),  # nobody had work
                          (1, Kind.ACK, Flag(0)),  # peer 0 had: peer 1 must come straight back
                          (0, Kind.ACK, Flag.IDLE), (1, Kind.ACK, Flag.IDLE)]
    assert peers.outputs == [(0, 3)] * model.cfg.num_hidden_layers
    # Patient waits (no hard polling) only for the headers after a round without work.
    assert peers.waits == [(0, False), (1, False), (0, True), (1, True), (0, False), (1, False),
                           (0, True), (1, True)]


class IdleRounds(Rank):
    """An attention rank's idle rounds: counts them; `all_idle` is what the FFN ranks answer."""

    has_peers = True

    def __init__(self, all_idle: bool):
        self.all_idle, self.count = all_idle, 0

    def idle(self) -> bool:
        self.count += 1
        return self.all_idle


class WaitsRecorded(queue.Queue):
    """The engine's command queue, answering at once: it records how long the loop would have
    waited for a command instead of waiting (no wall clock, as test_shm_ring's fake clock)."""

    waits: list[float] = []

    def get(self, block=True, timeout=None):
        if block:  # get_nowait() comes here too
            WaitsRecorded.waits.append(timeout)
        return super().get(block=False)


def _waits_between_idle_rounds(engine: LLMEngine, all_idle: bool, monkeypatch) -> list[float]:
    monkeypatch.setattr(async_engine, "queue", SimpleNamespace(Queue=WaitsRecorded, Empty=queue.Empty))
    WaitsRecorded.waits = []
    rounds = IdleRounds(all_idle)
    server = AsyncEngine(lambda: (engine, rounds))
    try:
        deadline = time.monotonic() + 30
        while rounds.count < 12 and server.healthy and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rounds.count >= 12, server.error
        return WaitsRecorded.waits[:10]
    finally:
        server.close()


def test_idle_attention_rank_backs_off_only_while_no_rank_has_work(tiny_greedy_checkpoint, monkeypatch):
    """With every rank idle the wait before the next round doubles from IDLE_WAIT_S[0] up to
    IDLE_WAIT_S[1]; with some rank busy there is no wait: the rounds follow the FFN ranks' pace."""
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_model_len=64))
    first, most = IDLE_WAIT_S
    assert _waits_between_idle_rounds(engine, True, monkeypatch) == [min(first * 2 ** i, most) for i in range(10)]
    assert _waits_between_idle_rounds(engine, False, monkeypatch) == []


def test_a_request_arriving_while_the_deployment_idles_is_served(tiny_greedy_checkpoint):
    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_model_len=64))
    want = engine.generate(["1 3 5"], SamplingParams(temperature=0, max_tokens=4))[0].token_ids
    rounds = IdleRounds(all_idle=True)
    server = AsyncEngine(lambda: (engine, rounds))
    try:
        time.sleep(0.2)  # long enough for the waits between idle rounds to reach their maximum
        prompt = engine.tokenizer("1 3 5")["input_ids"]

        async def run():
            return [d async for d in server.generate(prompt, SamplingParams(temperature=0, max_tokens=4))]

        deltas = asyncio.run(run())
        assert [t for d in deltas for t in d.token_ids] == want and deltas[-1].finish_reason == "length"
    finally:
        server.close()
