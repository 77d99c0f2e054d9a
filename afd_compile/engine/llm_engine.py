"""The monolithic engine: add_request / step / generate, as in vLLM's LLMEngine.

`step()` reads as three lines: schedule, run the model, postprocess (sample, append, stop).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from afd_compile.compilation import allow_decode_recompiles, context_buckets
from afd_compile.config import EngineConfig
from afd_compile.engine.block_manager import BlockManager
from afd_compile.engine.detokenizer import IncrementalDetokenizer, cut_at_stop
from afd_compile.engine.model_runner import ModelRunner
from afd_compile.engine.sampler import Sampler
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.scheduler import ScheduledBatch, Scheduler
from afd_compile.engine.sequence import Sequence
from afd_compile.errors import AfdError
from afd_compile.model.loader import chat_prompt_ids, load_model, load_tokenizer, prompt_ids

log = logging.getLogger("afd.engine")


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict] | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, model=None, tokenizer=None, runner_factory=None):
        """runner_factory(model, max_model_len) builds the model runner; default: the monolithic
        ModelRunner. The AFD attention role passes one that talks to the FFN ranks."""
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self.model = model or load_model(config.model, dtype=config.torch_dtype, device=config.device)
        self.max_model_len = config.resolve_max_model_len(self.model.cfg)
        if not config.enforce_eager:
            allow_decode_recompiles(config.batch_buckets, self.max_model_len)
        num_blocks = config.kv_cache_blocks(self.model.cfg, self.max_model_len)
        self.model.setup_caches(num_blocks, config.block_size, self.max_model_len)
        log.info("KV cache: %d blocks of %d positions (%d positions), prefix caching %s", num_blocks,
                 config.block_size, num_blocks * config.block_size, "on" if config.enable_prefix_caching else "off")
        self.runner = (runner_factory or (lambda m, n: ModelRunner(m, config, n)))(self.model, self.max_model_len)
        eos = self.model.cfg.eos_token_id
        eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}) - {None}
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, eos_ids, self.max_model_len,
                                   BlockManager(num_blocks, config.block_size, config.enable_prefix_caching))
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Sequence] = {}

    # ---- requests
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.config.model)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        ids = prompt_ids(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise AfdError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise AfdError(f"the prompt has {len(ids)} tokens, but this model's context length is "
                           f"{self.max_model_len} (prompt plus at least one generated token must fit)")
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise AfdError(f"prompt token ids must be in [0, {vocab})")
        # No request fails for lack of KV blocks: one of max_model_len fits (kv_cache_blocks), and
        # a sequence short of blocks is preempted until others finish.
        seq = Sequence(ids, params or SamplingParams(), detokenizer=IncrementalDetokenizer(self.tokenizer))
        if request_id is not None:
            seq.request_id = request_id
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def warm_up(self) -> None:
        """Compiles (on CUDA, captures) the decode step of every batch size and context bucket
        now, as vLLM captures its CUDA graphs at start-up: otherwise the first step of each new
        (batch, context) bucket pair waits for its compilation mid-request (15-20 s each on
        CPU; ~1 s once inductor's on-disk cache holds it). Every step runs through the runner's
        own decode (an AFD rank's FFN ranks compile their side too), with every row on the KV
        cache's scratch block, so no sequence's cache changes. Nothing to do with enforce_eager."""
        if self.config.enforce_eager:
            return
        start = time.monotonic()
        for n_ctx in context_buckets(self.max_model_len):
            prompt = [0] * n_ctx  # a decode over sequences this long attends over n_ctx positions
            scratch = [self.model.scratch_block] * self.scheduler.block_manager.blocks_for(n_ctx)
            # Every batch size, not only the buckets: an AFD rank cuts a batch into micro-batches
            # by its size. An already compiled shape replays in milliseconds.
            for n in range(1, self.config.max_num_seqs + 1):
                self.runner.decode([Sequence(prompt, SamplingParams(), block_table=scratch) for _ in range(n)])
            log.info("warm-up: decode steps over %d positions ready (%.0f s so far)", n_ctx, time.monotonic() - start)

    # ---- the step
    def step(self) -> list[Sequence]:
        """Runs one prefill or decode step; returns the sequences that got a new token."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self._run(batch)
        return self._postprocess(batch, logits)

    def _run(self, batch: ScheduledBatch):
        if batch.is_prefill:
            return self.runner.prefill(batch.seqs, batch.chunk_lens)
        return self.runner.decode(batch.seqs)

    def _postprocess(self, batch: ScheduledBatch, logits) -> list[Sequence]:
        due = self.scheduler.computed(batch)
        seqs = [batch.seqs[i] for i in due]
        if len(due) < len(batch.seqs):  # prefills with prompt chunks still to compute
            logits = logits[due]
        sampled = self.sampler(logits, seqs)
        for seq, token, logprob in zip(seqs, sampled.token_ids, sampled.logprobs):
            self.scheduler.append_token(seq, token)
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            self._check_stop_strings(seq)
            if seq.finished:
                self.requests.pop(seq.request_id, None)
        return seqs

    def _check_stop_strings(self, seq: Sequence) -> None:
        if not seq.params.stop or not seq.detokenizer.update(seq.output_token_ids):
            return
        text, found = cut_at_stop(seq.detokenizer.text, seq.params.stop)
        if found:
            if not seq.finished:
                self.scheduler.finish(seq, "stop")
            else:  # as in vLLM, a stop string matched on the last allowed token wins over "length"
                seq.finish_reason = "stop"
        seq.detokenizer.text = text

    # ---- offline batch API
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise AfdError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        seqs = []
        try:
            for p, sp in zip(prompts, params_list):
                seqs.append(self.add_request(p, sp))
        except Exception:  # a bad prompt: queue none of the batch, so the engine is left as it was
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        while self.scheduler.has_work():
            self.step()
        return [Completion(s.request_id, s.prompt_token_ids, s.output_token_ids, s.output_text, s.finish_reason,
                           s.output_logprobs or None) for s in seqs]
