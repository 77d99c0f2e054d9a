"""One config object, built once from the CLI (or API) and passed everywhere, and the names and
limits every layer checks against. The ground floor: imports torch and topology, nothing that
loads models, opens connectors or joins process groups."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afd_compile.errors import AfdError
from afd_compile.topology import Topology, parse_role

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "afd-demo-moe"
CONNECTORS = ("gloo", "shm", "nccl")
EP_DISPATCH = ("sort", "deepspeed")  # FFN expert parallelism: moe_kernels' sort-based all-to-all, or DeepSpeed-MoE
# The connector's step header carries one row count per micro-batch in a fixed-size frame.
MAX_MICRO_BATCHES = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Cap the default context so a checkpoint advertising 160k positions does not size KV block
# tables and compiled context buckets for it on a laptop.
DEFAULT_MAX_MODEL_LEN_CAP = 2048
# Without --kv-cache-memory-bytes the KV cache takes this fraction of the memory available at
# start-up, or less: what --max-num-seqs sequences of max_model_len need.
KV_CACHE_MEMORY_FRACTION = 0.1


def cache_dir(*parts: str) -> Path:
    """Where afd writes what it may rebuild (benchmark runs, compiled kernels' caches), never the
    checkout: $AFD_CACHE_DIR, else $XDG_CACHE_HOME/afd-compile, else ~/.cache/afd-compile."""
    root = os.environ.get("AFD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "afd-compile"
    return Path(root, *parts)


def check_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory (one with a config.json), checked before anything loads."""
    if not str(path).strip():
        raise AfdError("model directory is empty: give the path of a Hugging Face model directory")
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise AfdError(f"model directory {str(path)!r} does not exist (or is not a directory)")
    if not (resolved / "config.json").is_file():
        raise AfdError(f"model directory {str(path)!r} has no config.json: it is not a Hugging Face model directory")
    return resolved


def resolve_device(device: str) -> str:
    """auto -> cuda or cpu; cuda without a GPU is an error here, before anything loads."""
    if device not in ("auto", "cpu", "cuda"):
        raise AfdError(f"device {device!r} is not supported; choose auto, cpu or cuda")
    if device == "cpu":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    why = f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else \
        f"this torch (CUDA {torch.version.cuda}) sees no GPU"
    raise AfdError(f"device 'cuda' is not available: {why}; use --device cpu (or auto)")


def available_memory(device: str) -> int:
    """Bytes free for the KV cache now: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


@dataclass
class EngineConfig:
    model: str | Path = DEFAULT_MODEL
    max_num_seqs: int = 64  # most requests running at once (the batch, not the KV memory)
    max_model_len: int | None = None  # context length; default min(max_position_embeddings, 2048)
    max_num_batched_tokens: int = 2048  # prefill token budget of one step
    dtype: str = "float32"
    device: str = "cpu"  # cpu, cuda, or auto (cuda when this torch sees a GPU)
    enforce_eager: bool = False  # as in vLLM: no torch.compile
    batch_buckets: tuple[int, ...] = field(default=DEFAULT_BUCKETS)
    seed: int = 0
    block_size: int = 16  # KV cache positions per block
    kv_cache_memory_bytes: int | None = None  # vLLM's flag; default: see KV_CACHE_MEMORY_FRACTION
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise AfdError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        self.device = resolve_device(self.device)
        if self.max_num_seqs < 1:
            raise AfdError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise AfdError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens < 1:
            raise AfdError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise AfdError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise AfdError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        buckets = sorted({b for b in self.batch_buckets if b < self.max_num_seqs} | {self.max_num_seqs})
        self.batch_buckets = tuple(buckets)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolve_max_model_len(self, hf_config) -> int:
        limit = hf_config.max_position_embeddings
        if self.max_model_len is None:
            return min(limit, DEFAULT_MAX_MODEL_LEN_CAP)
        if self.max_model_len > limit:
            raise AfdError(f"max_model_len {self.max_model_len} exceeds the model's "
                           f"max_position_embeddings {limit}")
        return self.max_model_len

    def kv_cache_blocks(self, hf_config, max_model_len: int) -> int:
        """How many KV blocks the cache has: --kv-cache-memory-bytes of them, else see
        KV_CACHE_MEMORY_FRACTION. AfdError when one sequence of max_model_len would not fit."""
        per_block = (hf_config.num_hidden_layers * self.block_size * (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim)
                     * self.torch_dtype.itemsize)
        need = -(-max_model_len // self.block_size)
        if self.kv_cache_memory_bytes is not None:
            blocks = self.kv_cache_memory_bytes // per_block
            if blocks < need:
                raise AfdError(f"--kv-cache-memory-bytes {self.kv_cache_memory_bytes} holds {blocks} KV blocks of "
                               f"{self.block_size} positions ({per_block} bytes each), but one sequence of "
                               f"max_model_len {max_model_len} needs {need}: give at least {need * per_block} bytes "
                               "or a smaller --max-model-len")
            return blocks
        return max(need, min(self.max_num_seqs * need, int(available_memory(self.device) * KV_CACHE_MEMORY_FRACTION)
                             // per_block))

    def bucket(self, batch_size: int) -> int:
        """Smallest compiled batch size that holds batch_size rows."""
        return next(b for b in self.batch_buckets if b >= batch_size)


@dataclass
class AFDConfig:
    """Where this process sits in an AFD deployment (None afd_size: monolithic)."""

    afd_size: str
    role: str = "attention"
    rank: int = 0
    micro_batches: int = 1
    connector: str = "gloo"
    timeout_s: float = 60.0  # rendezvous and every connector wait
    ep_dispatch: str = "sort"  # FFN expert parallelism: "sort" (moe_kernels) or "deepspeed"
    trace: str | None = None  # write this rank's Chrome trace here on exit
    connector_delay_us: float = 0.0  # injected per-message link delay (connector/delay.py), same host only

    def __post_init__(self):
        self.topology = Topology.parse(self.afd_size)
        self.role = parse_role(self.role)
        self.topology.global_rank(self.role, self.rank)  # validates the rank
        if not 1 <= self.micro_batches <= MAX_MICRO_BATCHES:
            raise AfdError(f"micro_batches must be in 1..{MAX_MICRO_BATCHES}, got {self.micro_batches}")
        if self.timeout_s <= 0:
            raise AfdError(f"timeout must be positive, got {self.timeout_s}")
        if self.connector not in CONNECTORS:
            raise AfdError(f"connector {self.connector!r} is not one of {', '.join(CONNECTORS)}")
        if self.connector_delay_us < 0:
            raise AfdError(f"connector delay must be >= 0 us, got {self.connector_delay_us}")
        if self.connector_delay_us and self.connector == "nccl":
            raise AfdError("--connector-delay-us works with the CPU connectors (gloo, shm), not nccl")
        if self.ep_dispatch not in EP_DISPATCH:
            raise AfdError(f"ep_dispatch {self.ep_dispatch!r} is not one of {', '.join(EP_DISPATCH)}")
