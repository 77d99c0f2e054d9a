"""The engine: requests in, tokens out. Scheduler, KV blocks, model runner, sampler."""

from afd_compile.engine.llm_engine import LLMEngine
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.sequence import Sequence

__all__ = ["LLMEngine", "SamplingParams", "Sequence"]
