"""Ranks placed by a cluster launcher: torchrun's and srun's environment maps to (role, rank),
FFN ranks first, and 1A1F under `torchrun --standalone` generates what the monolithic engine does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from afd_compile.config import EngineConfig
from afd_compile.engine import LLMEngine, SamplingParams
from afd_compile.errors import AfdError
from afd_compile.roles.rank_spec import cluster_rank
from afd_compile.topology import Topology

TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
SLURM = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}


def test_no_launcher_means_no_cluster_rank():
    assert cluster_rank({}) is None
    assert cluster_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) is None  # the batch script, not an srun task


@pytest.mark.parametrize("env, launcher, role_rank, local", [
    (TORCHRUN, "torchrun", ("attention", 0), 0),
    (SLURM, "slurm", ("ffn", 1), 1),
])
def test_global_rank_maps_to_role_with_ffn_ranks_first(env, launcher, role_rank, local):
    cluster = cluster_rank(env)
    assert (cluster.launcher, cluster.local_rank) == (launcher, local)
    assert cluster.role_rank(Topology.parse("2A2F")) == role_rank


def test_every_global_rank_has_one_place():
    topo = Topology.parse("3A2F")
    places = [cluster_rank({**TORCHRUN, "RANK": str(r), "WORLD_SIZE": "5"}).role_rank(topo) for r in range(5)]
    assert places == [("ffn", 0), ("ffn", 1), ("attention", 0), ("attention", 1), ("attention", 2)]


def test_wrong_process_count_is_a_clear_error():
    with pytest.raises(AfdError, match="torchrun started 4 processes, but afd_size 1A1F has 2 ranks"):
        cluster_rank(TORCHRUN).role_rank(Topology.parse("1A1F"))


def test_unset_rank_is_a_clear_error():
    with pytest.raises(AfdError, match="RANK, WORLD_SIZE, LOCAL_RANK are not all set"):
        cluster_rank({"TORCHELASTIC_RUN_ID": "job", "RANK": "0"})


PROMPTS = ["1 3 5 7 9", "40 30 20"]


def test_torchrun_standalone_1a1f_matches_monolithic(shipped_model, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torch installs torchrun beside the interpreter"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "AFD_DIST_SECRET")}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "afd_compile", "generate",
                           "--model", str(shipped_model), "--afd-size", "1A1F", "--connector", "gloo",
                           "--enforce-eager", "--chat", "--max-tokens", "8", *PROMPTS],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    engine = LLMEngine(EngineConfig(model=shipped_model, enforce_eager=True, max_num_seqs=2))
    refs = engine.generate([engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=8))
    assert sorted((r["index"], r["token_ids"]) for r in rows) == [(i, r.token_ids) for i, r in enumerate(refs)]
