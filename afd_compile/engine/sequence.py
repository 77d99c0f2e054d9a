"""One request's state as it moves from waiting to running to finished."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from afd_compile.engine.detokenizer import IncrementalDetokenizer
from afd_compile.engine.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None  # set by the engine that runs the request
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    block_table: list[int] = field(default_factory=list)  # KV cache blocks while running (block_manager.py)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache keys of its full blocks so far
    num_computed: int = 0  # tokens whose latents are in the KV cache
    generator: torch.Generator | None = None  # per-request seeded sampling

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def output_text(self) -> str:
        """The output decoded so far (decoded now, incrementally); "" without a detokenizer."""
        if self.detokenizer is None:
            return ""
        self.detokenizer.update(self.output_token_ids)
        return self.detokenizer.text

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefill(self) -> bool:
        """More than the last token is still to compute: a prompt (or, after a preemption, the
        whole sequence) not yet cached. A decode step computes the one last token."""
        return len(self) - self.num_computed > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
