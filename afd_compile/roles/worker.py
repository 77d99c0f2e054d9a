"""Start-up of one AFD rank: validate, load only this rank's weights, join the world, wire
the connector, then run (FFN) or hand back an engine (attention). When a peer dies, both
roles join the world's next generation (rendezvous.py) with the weights they hold."""

from __future__ import annotations

import dataclasses
import logging

import torch

from afd_compile.config import AFDConfig, EngineConfig
from afd_compile.connector import make_connector
from afd_compile.errors import AfdError
from afd_compile.engine.llm_engine import LLMEngine
from afd_compile.model.ffn_half import set_ep_group
from afd_compile.model.loader import load_config, load_model
from afd_compile.roles import rendezvous
from afd_compile.roles.attention import AFDModelRunner
from afd_compile.roles.attention_rank import AttentionRank
from afd_compile.roles.rank_spec import cluster_rank
from afd_compile.roles.ffn import FFNWorker, GracefulStop
from afd_compile.trace import Tracer

log = logging.getLogger("afd")


def _check(engine_cfg: EngineConfig, afd: AFDConfig):
    hf = load_config(engine_cfg.model)
    afd.topology.check_experts(hf.n_routed_experts)
    return hf


def _connector(afd: AFDConfig, world, hf, engine_cfg: EngineConfig):
    connector = _links(afd, world, hf, engine_cfg)
    if afd.connector_delay_us:
        from afd_compile.connector.delay import DelayedConnector

        connector = DelayedConnector(connector, afd.connector_delay_us, hf.hidden_size, engine_cfg.torch_dtype)
    return connector


def _links(afd: AFDConfig, world, hf, engine_cfg: EngineConfig):
    topo = afd.topology
    attention_ranks = [afd.rank] if afd.role == "attention" else topo.attention_peers(afd.rank)
    common = dict(hidden_size=hf.hidden_size, dtype=engine_cfg.torch_dtype, timeout_s=afd.timeout_s)
    if afd.connector == "shm":
        is_attention = afd.role == "attention"
        links = {i: (f"afd-{world.generation}-a{a}", is_attention) for i, a in enumerate(attention_ranks)}
        if not is_attention:  # the attention rank creates its link's rings
            world.store.wait([f"afd/shm/{a}" for a in attention_ranks])
        connector = make_connector("shm", links=links, is_attention=is_attention, max_message_tokens=max(
            engine_cfg.max_num_batched_tokens, engine_cfg.max_num_seqs), **common)
        if is_attention:
            world.store.set(f"afd/shm/{afd.rank}", "ready")
        return connector
    if afd.role == "attention":
        peers = {0: topo.global_rank("ffn", topo.ffn_of(afd.rank))}
    else:
        peers = {i: topo.global_rank("attention", a) for i, a in enumerate(attention_ranks)}
    if afd.connector == "nccl":
        common.update(nccl_group=world.nccl_group, device=torch.device(engine_cfg.device))
    return make_connector(afd.connector, peer_ranks=peers, **common)


def _rank_device(engine_cfg: EngineConfig, afd: AFDConfig) -> EngineConfig:
    """With device "cuda", ranks sharing a host take one GPU each: by the rank on its node a
    cluster launcher gave it (LOCAL_RANK), else by global rank."""
    if engine_cfg.device != "cuda":
        return engine_cfg
    if afd.connector != "nccl":
        raise AfdError(f"on CUDA the connector must be nccl, not {afd.connector!r}")
    cluster = cluster_rank()
    index = (cluster.local_rank if cluster else afd.topology.global_rank(afd.role, afd.rank)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return dataclasses.replace(engine_cfg, device=f"cuda:{index}")


def run_ffn(engine_cfg: EngineConfig, afd: AFDConfig) -> int:
    """Serves until every attention rank has left; returns the number of parameters this rank held.
    A peer that dies ends only the current generation: this rank waits for the next one (up to
    the connector timeout) instead of exiting."""
    hf = _check(engine_cfg, afd)
    engine_cfg = _rank_device(engine_cfg, afd)
    topo = afd.topology
    model = load_model(engine_cfg.model, part="ffn", ep_rank=afd.rank, ep_size=topo.num_ffn,
                       dtype=engine_cfg.torch_dtype, device=engine_cfg.device, ep_dispatch=afd.ep_dispatch)
    log.info("ffn rank %d of %s: experts %d..%d of %d, mapping %s", afd.rank, topo,
             afd.rank * hf.n_routed_experts // topo.num_ffn, (afd.rank + 1) * hf.n_routed_experts // topo.num_ffn - 1,
             hf.n_routed_experts, topo.describe())
    tracer = Tracer(f"ffn {afd.rank}", topo.global_rank("ffn", afd.rank), enabled=afd.trace is not None)
    world = None
    try:
        with GracefulStop(afd.rank) as stop:
            while True:
                world = rendezvous.join(topo, "ffn", afd.rank, afd.timeout_s, nccl=afd.connector == "nccl",
                                        previous=world)
                rendezvous.share_cores(world)
                if topo.num_ffn > 1:
                    set_ep_group(model.ffn_halves, world.ffn_group)
                connector = _connector(afd, world, hf, engine_cfg)
                try:
                    stop.serving = True
                    FFNWorker(model, world, connector, tracer, compile_decode=not engine_cfg.enforce_eager).run()
                    return sum(p.numel() for p in model.parameters())
                except RuntimeError as e:  # a ConnectorError or a gloo error: a peer died
                    if stop.requested:  # stopping anyway: no next generation to wait for
                        log.warning("ffn rank %d: stopped (%s)", afd.rank, str(e).splitlines()[0])
                        return sum(p.numel() for p in model.parameters())
                    log.warning("ffn rank %d: generation %s broke (%s); waiting for the next one", afd.rank,
                                world.generation, str(e).splitlines()[0])
                    set_ep_group(model.ffn_halves, None)
                finally:
                    stop.serving = False
                    connector.close()
    finally:
        if afd.trace:
            tracer.save(afd.trace)
        rendezvous.leave()


def attention_engine(engine_cfg: EngineConfig, afd: AFDConfig) -> tuple[LLMEngine, AttentionRank]:
    """Joins as an attention rank: its engine, and the rank (close it when done)."""
    hf = _check(engine_cfg, afd)
    engine_cfg = _rank_device(engine_cfg, afd)
    topo = afd.topology
    model = load_model(engine_cfg.model, part="attention", dtype=engine_cfg.torch_dtype, device=engine_cfg.device)
    log.info("attention rank %d of %s: sends to ffn rank %d, %d micro-batch(es), connector %s", afd.rank, topo,
             topo.ffn_of(afd.rank), afd.micro_batches, afd.connector)
    world = rendezvous.join(topo, "attention", afd.rank, afd.timeout_s, nccl=afd.connector == "nccl")
    rendezvous.share_cores(world)
    tracer = Tracer(f"attention {afd.rank}", world.global_rank, enabled=afd.trace is not None)
    connector = _connector(afd, world, hf, engine_cfg)
    engine = LLMEngine(engine_cfg, model=model, runner_factory=lambda m, n: AFDModelRunner(
        m, engine_cfg, n, connector, afd.micro_batches, tracer, world))
    return engine, AttentionRank(engine.runner, afd, tracer, lambda w: _connector(afd, w, hf, engine_cfg))
