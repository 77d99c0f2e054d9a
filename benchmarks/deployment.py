"""The deployment harness of `afd bench --scenario afd`: `compare` deploys every configuration at
once, each in its own pinned, spawned processes (see Deployment), warms each up at every batch size
(which compiles its graphs), then measures them in turn, round after round."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import traceback

import torch

from afd_compile.errors import AfdError

from benchmarks.monolithic import EngineBackend

TIMEOUT_S = 900


def _pin(cores: list[int]) -> None:
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def _engine_config(args, buckets):
    from afd_compile.config import EngineConfig

    return EngineConfig(model=args.model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                        max_num_seqs=max(buckets), batch_buckets=tuple(sorted(buckets)), dtype=args.dtype)


class Deployment:
    """One configuration (monolithic, or 1A1F with m micro-batches and a link delay) kept running
    in its own pinned processes and measured on request. Every configuration of a comparison is
    deployed at once and they are measured in turn, round after round: this VM's speed drifts by
    tens of percent within minutes, and only interleaved runs compare configurations fairly.
    Idle deployments sleep (an idle attention rank pings its FFN rank every few seconds)."""

    def __init__(self, args, cores, prompts, batches, m=None, delay_us=0.0):
        from afd_compile.roles.rendezvous import free_port

        self.name = "monolithic" if m is None else f"1A1F m={m}" + (f" delay {delay_us:g} us" if delay_us else "")
        # Spawned, not forked: a process whose OpenMP pool has run (a test process, say) forks
        # children that hang in their first parallel region (libgomp is not fork-safe).
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        buckets = set(batches) | {math.ceil(b / (m or 1)) for b in batches}
        driver = (self.commands, self.results, args, prompts, buckets)
        if m is None:
            self.procs = [ctx.Process(target=_monolithic_main, args=(*driver, cores))]
        else:
            afd = dict(micro_batches=m, connector=args.connector, connector_delay_us=delay_us, timeout_s=120)
            port = free_port()
            self.procs = [ctx.Process(target=_rank_main, args=(*driver, role, afd, port, core))
                          for role, core in (("ffn", cores[1]), ("attention", cores[0]))]
        for p in self.procs:
            p.start()

    def request(self, batch: int, what: str = "measure") -> None:
        """what: "warm" (compile and warm this batch size), "measure" or "trace" (measure, then
        one more run recording the ranks' timelines)."""
        self.commands.put((what, batch))

    def result(self) -> dict:
        """The answer to the oldest request: {"step_times": [...], "events": [...] if traced}."""
        waited = 0.0
        while True:
            try:
                kind, payload = self.results.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if any(not p.is_alive() for p in self.procs) and self.results.empty():
                    raise AfdError(f"{self.name}: a process died without reporting") from None
                if waited > TIMEOUT_S:
                    raise AfdError(f"{self.name}: no answer for {TIMEOUT_S} s") from None
        if kind == "error":
            raise AfdError(f"{self.name} failed:\n{payload}")
        return payload

    def close(self) -> None:
        self.commands.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


IDLE_PING_S = 5.0  # an idle attention rank's heartbeat, well inside the FFN rank's connector timeout


def _drive(commands, results, backend, prompts, steps: int, idle=None) -> None:
    """A deployment's driver loop: answers requests until told to stop (None)."""
    while True:
        try:
            request = commands.get(timeout=IDLE_PING_S)
        except queue.Empty:
            if idle is not None:
                idle()
            continue
        if request is None:
            return
        what, b = request
        try:
            if what == "warm":
                backend.warm_up(prompts[:b], steps)
                results.put(("ok", {}))
                continue
            run = backend.measure(prompts[:b], steps)
            out = {"step_times": run.step_times, "outputs": run.outputs}
            if what == "trace":
                runner = backend.engine.runner
                backend.measure(prompts[:b], steps, on_decode=lambda: runner.record_trace(10 ** 9))
                out["events"] = runner.collect_trace(60)["traceEvents"]
            results.put(("ok", out))
        except BaseException:
            results.put(("error", traceback.format_exc()))
            return


def _monolithic_main(commands, results, args, prompts, buckets, cores) -> None:
    try:
        _pin(cores)
        from afd_compile.engine import LLMEngine

        backend = EngineBackend("monolithic", args, LLMEngine(_engine_config(args, buckets)))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        return
    _drive(commands, results, backend, prompts, args.steps)


def _rank_main(commands, results, args, prompts, buckets, role, afd_kwargs, port, core) -> None:
    try:
        _pin([core])
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from afd_compile.config import AFDConfig
        from afd_compile.roles.worker import attention_engine, run_ffn

        afd = AFDConfig(afd_size="1A1F", role=role, **afd_kwargs)
        cfg = _engine_config(args, buckets)
        if role == "ffn":
            run_ffn(cfg, afd)
            return
        engine, rank = attention_engine(cfg, afd)
    except BaseException:
        results.put(("error", f"{role}: {traceback.format_exc()}"))
        return
    try:
        _drive(commands, results, EngineBackend("1A1F", args, engine), prompts, args.steps, idle=rank.idle)
    finally:
        rank.close()


def _interleaved(deployments: dict, batches: dict, repeats: int, traced=()) -> dict:
    """deployments {key: Deployment}, batches {key: batch sizes}. Warms every deployment at its
    batch sizes (compiling its graphs), then measures `repeats` rounds, each deployment in turn (the order rotating).
    Returns {key: {batch: the fastest round's result, plus "round_tok_s": tokens/s of every
    round in order}}; keys in `traced` also record timelines (in their last round)."""
    for key, d in deployments.items():  # one at a time: compiling everywhere at once takes longer
        for b in batches[key]:
            d.request(b, "warm")
            d.result()
    best: dict = {key: {} for key in deployments}
    keys = list(deployments)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            d = deployments[key]
            for b in batches[key]:
                d.request(b, "trace" if key in traced and r == repeats - 1 else "measure")
                out = d.result()
                kept = best[key].setdefault(b, dict(out, round_tok_s=[]))
                kept["round_tok_s"].append(round_tok_s(out["step_times"], b))
                if sum(out["step_times"]) < sum(kept["step_times"]):
                    kept["step_times"] = out["step_times"]
                if "events" in out:
                    kept["events"] = out["events"]
    return best


def round_tok_s(step_times: list[float], batch: int) -> float:
    """Decode tokens/s over a round (not its fastest step), as monolithic.py reports."""
    return batch * len(step_times) / sum(step_times)


def compare(args, cores, prompts, configs: dict, traced=()) -> dict:
    """Deploys configs {key: (batches, m, delay_us)}, measures them interleaved, closes them."""
    deployments = {}
    try:
        for key, (batches, m, delay) in configs.items():
            deployments[key] = Deployment(args, cores, prompts, batches, m, delay)
        return _interleaved(deployments, {k: c[0] for k, c in configs.items()}, args.repeats, traced)
    finally:
        for d in deployments.values():
            d.close()
