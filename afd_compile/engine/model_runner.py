"""Prepares model inputs from scheduled sequences and runs the model.

Prefill runs eagerly over a right-padded [B, L] batch (shapes vary with every prompt).
Decode is one token per sequence, padded up to a batch bucket and attending over a context
bucket. On CPU each batch bucket is compiled exactly once (torch.compile, inductor, static
shapes but for the context span, which is dynamic) and then replayed for every context bucket;
padded rows use the cache's scratch block.
"""

from __future__ import annotations

import logging

import torch

from afd_compile.compilation import Compiling, CompiledPerShape, call_warm, compile_options, context_bucket, context_spans
from afd_compile.config import EngineConfig
from afd_compile.engine.model_inputs import DecodeRows, prefill_inputs
from afd_compile.engine.sequence import Sequence
from afd_compile.model.decoder import DeepseekV2

log = logging.getLogger("afd.compile")


def decode_over_span(model: DeepseekV2):
    """model's forward with the KV blocks it reads given as a tensor's length (see context_spans)."""

    def decode(tokens, positions, slot_mapping, block_tables, last_idx, span):
        return model(tokens, positions, slot_mapping, block_tables, last_idx, span.shape[0])

    return decode


class ModelRunner:
    def __init__(self, model: DeepseekV2, config: EngineConfig, max_model_len: int):
        """model: its KV cache set up (LLMEngine.__init__)."""
        self.model, self.config, self.max_model_len = model, config, max_model_len
        self.scratch = model.scratch_block
        self.device = model.embed_tokens.weight.device
        self.decode_steps = None  # CPU: one unguarded compiled step per (batch, context) bucket pair
        if config.enforce_eager:
            self.decode_fn = model
        elif self.device.type == "cpu":
            self.decode_steps = CompiledPerShape(
                decode_over_span(model), "decode", self.device,
                lambda key: f"decode step (batch {key[0]}, context up to {max_model_len} dynamic)")
            self.spans = context_spans(max_model_len, model.block_size)
        else:  # guarded: one graph per (batch, context) pair (the engine raised dynamo's recompile limit)
            self.decode_fn = torch.compile(model, dynamic=False, fullgraph=True,
                                           options=compile_options(self.device, cuda_graphs=True))
        self._compiled: set[tuple[int, int]] = set()  # decode bucket pairs compiled so far
        # Per batch bucket: the rows (token, position, cache row) and block tables every step
        # rewrites in place, and the model's inputs viewing their device copy.
        self._decode_inputs: dict[int, tuple[DecodeRows, tuple[torch.Tensor, ...]]] = {}

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], chunk_lens: list[int]) -> torch.Tensor:
        """Computes chunk_lens[i] uncached tokens of each sequence; logits [B, vocab] of each
        chunk's last token (meaningful only where the chunk completes the sequence)."""
        inputs = prefill_inputs(self.model, seqs, chunk_lens)
        n_ctx = max(s.num_computed + n for s, n in zip(seqs, chunk_lens))
        return self.model(*(t.to(self.device) for t in inputs), self.model.context_blocks(n_ctx)).cpu()

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token per running sequence; logits [len(seqs), vocab]."""
        n, B = len(seqs), self.config.bucket(len(seqs))
        if B not in self._decode_inputs:
            rows = DecodeRows(B, self.model, self.device)
            self._decode_inputs[B] = rows, (*rows.inputs, torch.zeros(B, dtype=torch.long, device=self.device))
        rows, inputs = self._decode_inputs[B]
        rows.stage(seqs)
        key = (B, context_bucket(max(len(s) for s in seqs), self.max_model_len))
        if self.decode_steps is not None:  # one graph per batch bucket
            return self.decode_steps(key[:1], *inputs, self.spans[key[1]])[:n].cpu()
        args = (*inputs, self.model.context_blocks(key[1]))
        if self.config.enforce_eager:
            logits = self.decode_fn(*args)
        elif key not in self._compiled:
            with Compiling() as compiling:
                logits = self.decode_fn(*args)
            log.info("compiled decode step (batch %d, context %d) in %.1f s", *key, compiling.seconds)
            self._compiled.add(key)
        else:
            logits = call_warm(self.decode_fn, *args)
        return logits[:n].cpu()
