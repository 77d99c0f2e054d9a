"""Where inductor keeps what it compiled (FX graph cache, AOT autograd cache, kernels): a stated
directory, so a restart of the same model and options loads its decode graphs instead of
compiling them again (~1 s a graph instead of ~13 s cold on the demo model, 2 cores).

The directory is cache_dir("inductor") (~/.cache/afd-compile/inductor; $AFD_CACHE_DIR moves it),
or $TORCHINDUCTOR_CACHE_DIR where the user set it. It is set in the environment, so every rank
a command starts shares it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from afd_compile.config import cache_dir

log = logging.getLogger("afd.compile")
ENV = "TORCHINDUCTOR_CACHE_DIR"


def _writable(path: Path) -> str | None:
    """None if files can be created in path (made if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def use_compile_cache() -> Path | None:
    """Points inductor's caches at the stated directory; returns it, or None when it is not
    writable (one warning line; inductor then uses a fresh temporary directory)."""
    given = os.environ.get(ENV)
    # Importing torch._inductor writes its default (/tmp/torchinductor_USER) into the environment:
    # that one is not the user's choice, and a reboot empties it.
    if given and os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        given = None
    path = Path(given or cache_dir("inductor"))
    why = _writable(path)
    if why is None:
        os.environ[ENV] = str(path)
        return path
    fallback = tempfile.mkdtemp(prefix="afd-inductor-")
    log.warning("compile cache %s is not writable (%s): compiling into %s, which a restart will not reuse",
                path, why, fallback)
    os.environ[ENV] = fallback
    return None
