"""Benchmark scenarios behind `afd bench --scenario NAME`; results go to
~/.cache/afd-compile/bench/ (afd_compile.config.cache_dir), or to an explicit --out; the committed ones
are in benchmarks/results/."""

from __future__ import annotations

from afd_compile.errors import AfdError


def run_scenario(args) -> dict:
    """Runs the scenario named by args.scenario; returns its result (also written as JSON)."""
    if args.scenario == "monolithic":
        from benchmarks.monolithic import run

        return run(args)
    if args.scenario == "serve":
        from benchmarks.serve import run

        return run(args)
    if args.scenario == "connector":
        from benchmarks.connector import run

        return run(args)
    if args.scenario == "afd":
        from benchmarks.afd import run

        return run(args)
    if args.scenario == "peers":
        from benchmarks.peers import run

        return run(args)
    if args.scenario == "moe":
        from benchmarks.moe import run

        return run(args)
    raise AfdError(f"unknown benchmark scenario {args.scenario!r}")
