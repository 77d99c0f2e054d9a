"""Builds the C++ CPU kernels of csrc/ (one extension, torch.ops.moe_cpu) once per machine (torch's cpp_extension, cached on disk).

Compiled for the host's own instruction set (-march=native), so the build directory is keyed by
the CPU's flags as well as the source: a cache carried to another kind of processor rebuilds
instead of faulting. When no compiler is available the build fails once, with one warning line,
and callers take their torch fallback.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("afd.kernels")
CSRC = Path(__file__).resolve().parent / "csrc"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


LOADED = False  # set once the kernels are loaded: compiled code branches on it as a constant


@functools.cache
def cpu_kernels() -> bool:
    """Whether torch.ops.moe_cpu is available (built and loaded now, or already)."""
    from torch.utils.cpp_extension import load

    sources = sorted(CSRC.glob("*.cpp"))
    text = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))
    key = hashlib.sha256(text + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:12]
    try:
        # -fopenmp: at::parallel_for's OpenMP pragmas; the process shares torch's libgomp (same soname).
        load(name=f"moe_cpu_{key}", sources=[str(p) for p in sources],
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=os.environ.get("AFD_VERBOSE_BUILD") == "1")
    except Exception as e:  # a missing compiler, headers or linker: any of them leaves the torch path
        log.warning("moe_kernels: C++ CPU kernels unavailable (%s: %s); using the torch path",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    # Output shape for torch.compile's tracing: the op is opaque to inductor, called directly by
    # its C++ wrapper without a Python frame.
    torch.library.register_fake("moe_cpu::grouped_experts")(lambda x, *_: torch.empty_like(x))
    torch.library.register_fake("moe_cpu::linear")(lambda x, w: x.new_empty((*x.shape[:-1], w.shape[0])))
    global LOADED
    LOADED = True
    return True
