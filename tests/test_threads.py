"""Where torch runs in a server: one thread per process builds and steps the engine (libgomp
then keeps its OpenMP workers spinning between a step's loops), and ranks sharing a host split
its cores between them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from afd_compile.config import EngineConfig
from afd_compile.engine.llm_engine import LLMEngine
from afd_compile.engine.rank import Rank
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.errors import AfdError
from afd_compile.roles.rendezvous import core_share
from afd_compile.serve.async_engine import AsyncEngine


def test_the_engine_is_built_and_stepped_on_the_engine_thread(tiny_greedy_checkpoint):
    threads = {}

    def build():
        threads["build"] = threading.get_ident()
        engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_model_len=64))
        step = engine.step

        def recorded_step():
            threads.setdefault("steps", set()).add(threading.get_ident())
            return step()

        engine.step = recorded_step
        return engine, Rank()

    server = AsyncEngine(build)
    try:
        prompt = server.engine.tokenizer("1 3 5")["input_ids"]

        async def run():
            return [d async for d in server.generate(prompt, SamplingParams(temperature=0, max_tokens=3))]

        assert sum(len(d.token_ids) for d in asyncio.run(run())) == 3
        assert threads["build"] == server.thread.ident != threading.get_ident()
        assert threads["steps"] == {server.thread.ident}
    finally:
        server.close()


def test_a_failed_build_is_raised_to_the_caller():
    def build():
        raise AfdError("no such model")

    with pytest.raises(AfdError, match="no such model"):
        AsyncEngine(build)


def test_ranks_on_one_host_share_its_cores():
    assert core_share(["a", "a"], "a", cores=8) == 4  # 1A1F on one host
    assert core_share(["a", "b", "a", "b"], "b", cores=8) == 4  # 2A2F over two hosts
    assert core_share(["a"] * 3 + ["b"], "a", cores=8) == 2
    assert core_share(["a"] * 4, "a", cores=2) == 1  # never none
