"""Everything that bends torch.compile for the decode steps, fenced in one place (as vLLM's
vllm/compilation/): inductor options, context buckets with a dynamic span, one unguarded graph
per shape key replayed without dynamo, the recompile limit, and the persistent host/device
input buffers the replay relies on.

The engine's runner, the attention rank and the FFN rank all compile through this module.
"""

from __future__ import annotations

import builtins
import logging
import time
import types

import numpy as np
import torch
import torch._dynamo
import torch.utils._pytree as pytree

from afd_compile.model.kv_cache import context_blocks

log = logging.getLogger("afd.compile")


class Compiling:
    """How many decode shapes this process compiles right now (/metrics' afd:compiles_running:
    a client waiting for a token can tell a compile from a slow step)."""

    running = 0

    def __enter__(self):
        Compiling.running += 1
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        Compiling.running -= 1

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def compile_options(device: torch.device, cuda_graphs: bool = False) -> dict:
    """Inductor options for a decode step. CPU: the C++ wrapper launches the step's kernels
    without a Python call per op, and matmuls with one row (batch-1 decode) become generated
    loops fused with their neighbours instead of a BLAS call each (at decode sizes per-call
    overhead is most of the step). CUDA: inductor's CUDA graph trees replay the whole step as
    one launch (gpt-fast's "reduce-overhead"), unless the caller captures its own graphs."""
    if device.type == "cpu":
        return {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}
    return {"triton.cudagraphs": cuda_graphs}


MIN_CONTEXT_BUCKET = 64


def context_buckets(max_model_len: int) -> tuple[int, ...]:
    """The cache spans a decode step may attend over: powers of two from MIN_CONTEXT_BUCKET, then
    max_model_len. A step attends over the smallest span holding its longest sequence, not the
    whole static cache: attention's time grows with the span (~0.55 us a position per 16 rows
    and layer on CPU, measured; 3x the 128-position time at 512), and padded positions are
    masked anyway. Doubling keeps the compiled graphs few and the waste under 2x."""
    spans, n = [], MIN_CONTEXT_BUCKET
    while n < max_model_len:
        spans.append(n)
        n *= 2
    return (*spans, max_model_len)


def context_bucket(n: int, max_model_len: int) -> int:
    """The span a decode step over sequences of at most n tokens attends over."""
    return next(b for b in context_buckets(max_model_len) if b >= n)


def context_spans(max_model_len: int, block_size: int) -> dict[int, torch.Tensor]:
    """Per context bucket, a tensor whose length is the number of KV blocks a step reads for it
    (kv_cache.context_blocks; its data is never read). A compiled step given that number as a
    tensor's length, marked dynamic over the buckets' range, is one graph for every context
    bucket: a serving start-up compiles one graph per batch bucket, not one per (batch, context)
    pair (7 instead of 28 on the demo model, ~13 s each cold on CPU), and no context growing into
    a new bucket mid-request waits for a compile. Attention over a dynamic span costs the demo
    model's batch-16 step nothing measurable (1.21 vs 1.27 ms at 64 positions, 1.61 vs 1.88 at 512)."""
    buckets = context_buckets(max_model_len)
    spans = {n: torch.empty(context_blocks(n, block_size), dtype=torch.int8) for n in buckets}
    lengths = [t.shape[0] for t in spans.values()]
    if lengths[0] != lengths[-1]:
        for span in spans.values():
            torch._dynamo.mark_dynamic(span, 0, min=lengths[0], max=lengths[-1])
    return spans


def allow_decode_recompiles(batch_buckets: tuple[int, ...], max_model_len: int) -> None:
    """Raises dynamo's process-wide recompile limit so a guarded torch.compile'd decode function
    (the CUDA paths) may specialise once per (batch, context) bucket pair: the default limit (8)
    would fall back to eager with more pairs than that. Called once, at engine start-up."""
    pairs = len(batch_buckets) * len(context_buckets(max_model_len))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, pairs + 1)


def _no_guards(entries):
    return [False] * len(entries)


def _call(*args):
    return fn(*args)  # noqa: F821 (`fn` is a global of each copy made in CompiledPerShape)


def _same(a, b) -> bool:
    """Whether a call's argument is the recorded one: the same object, or an equal plain value."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b


class _Replay:
    """One key's graph called without dynamo. The backend records what dynamo's bytecode passes
    inductor's compiled function: the graph's flat inputs, i.e. the caller's tensors, the
    parameters and the KV cache, gathered attribute by attribute at every call (and the values
    of its dynamic sizes). A decode step is given the same tensors every time (persistent input
    buffers; weights and caches allocated once; one span tensor per context bucket), so a later
    call with the arguments of a recorded one can pass its inputs straight to the compiled
    function and rebuild the result from its outputs. That skips dynamo's frame entry: ~50-100
    us a call on CPU (measured), a third of a batch-1 step. `fn` must be free of Python side
    effects, as the compiled steps are: dynamo would replay those after the graph."""

    def __init__(self, options: dict):
        self.options = options
        self.graph = None  # inductor's compiled function (AOTAutograd's runtime wrapper around it)
        self.inputs: tuple = ()  # its inputs at the last call through dynamo
        self.outputs: list = []  # its outputs then
        # Per replayable call: the caller's arguments, the graph's inputs, and (indices into the
        # outputs, pytree spec) rebuilding the caller's result.
        self.calls: list[tuple[tuple, tuple, tuple]] = []

    def backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graph = compile_fx(gm, example_inputs, config_patches=self.options)

        def record(*inputs):
            self.graph, self.inputs = graph, inputs
            self.outputs = graph(*inputs)
            return self.outputs

        return record

    def learn(self, args: tuple, result) -> None:
        """After a call through dynamo: replay later calls with these arguments if every tensor of
        the result is one of the graph's outputs (else dynamo built it, and keeps doing so)."""
        leaves, spec = pytree.tree_flatten(result)
        ids = {id(t): i for i, t in enumerate(self.outputs)}
        if self.graph is not None and all(isinstance(t, torch.Tensor) and id(t) in ids for t in leaves):
            self.calls.append((args, self.inputs, ([ids[id(t)] for t in leaves], spec)))
        self.outputs = []  # not kept alive past the call

    def find(self, args: tuple) -> tuple | None:
        """The recorded call with these arguments, if any."""
        return next((c for c in self.calls if len(args) == len(c[0]) and all(map(_same, args, c[0]))), None)

    def __call__(self, call: tuple):
        _, inputs, (indices, spec) = call
        outputs = self.graph(*inputs)
        return pytree.tree_unflatten([outputs[i] for i in indices], spec)


class CompiledPerShape:
    """fn torch.compile'd once per input shape, the caller naming the shape (a key), without dynamo's
    guards: they would re-check on every call what the key already tells, at ~70-80 us a call on
    CPU (measured on the AFD attention step; vLLM drops them likewise). Each key's function is a
    copy of one trampoline under its own code object, so dynamo keeps one graph per key. Calls
    with a key's recorded arguments skip dynamo altogether (_Replay)."""

    def __init__(self, fn, name: str, device: torch.device, describe=None):
        """describe(key): the shape in words, for the log line each compile writes."""
        self.fn, self.name, self.device = fn, name, device
        self.describe = describe or (lambda key: f"{name} {key}")
        self.compiled: dict[tuple, tuple[object, _Replay]] = {}

    def __contains__(self, key: tuple) -> bool:
        return key in self.compiled

    def __call__(self, key: tuple, *args):
        entry = self.compiled.get(key)
        if entry is None:
            code = _call.__code__.replace(co_name=f"{self.name}_{'_'.join(map(str, key))}")
            copy = types.FunctionType(code, {"fn": self.fn, "__builtins__": builtins})
            replay = _Replay(compile_options(self.device))
            # dynamic=None: static shapes but for the dims the caller marked dynamic (context_spans).
            compiled = torch.compile(copy, backend=replay.backend, dynamic=None, fullgraph=True,
                                     options={"guard_filter_fn": _no_guards})
            entry = compiled, replay
        compiled, replay = entry
        call = replay.find(args)
        if call is not None:
            return replay(call)
        if key in self.compiled:
            out = compiled(*args)
        else:
            with Compiling() as compiling:
                out = compiled(*args)  # compiles on a key's first call
            log.info("compiled %s in %.1f s", self.describe(key), compiling.seconds)
        replay.learn(args, out)
        self.compiled[key] = entry  # a key counts as compiled only once a call succeeded
        return out


def call_warm(fn, *args):
    """Calls a torch.compile'd fn whose graphs all exist already, evaluating only the guards that
    tell them apart: the full guard check costs tens of microseconds per call on CPU."""
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        return fn(*args)


class CpuGpuBuffer:
    """A persistent input buffer (vLLM's CpuGpuBuffer): host rows the runner rewrites in place every
    step through `np` (plain stores, no torch op per field), and their device copy `gpu`, the
    same tensor on CPU. A compiled step given the same tensors every call costs ~30 us less on
    CPU than one given fresh ones, and _Replay needs them to be the same."""

    def __init__(self, *size: int, device: torch.device, dtype: torch.dtype = torch.long):
        self.cpu = torch.zeros(*size, dtype=dtype)
        self.np: np.ndarray = self.cpu.numpy()
        self.gpu = self.cpu if device.type == "cpu" else self.cpu.to(device)

    def copy_to_gpu(self) -> torch.Tensor:
        """The device copy after this step's host rows reached it. Blocking: the host rows are
        rewritten next step, which a copy still in flight would read."""
        if self.gpu is not self.cpu:
            self.gpu.copy_(self.cpu)
        return self.gpu
