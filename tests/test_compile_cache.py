"""The compile cache directory: stated, shared through the environment, and a fallback with one
warning when it cannot be written."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from afd_compile.compile_cache import ENV, use_compile_cache


def test_inductor_caches_go_to_afd_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("AFD_CACHE_DIR", str(tmp_path))
    assert use_compile_cache() == tmp_path / "inductor"
    assert os.environ[ENV] == str(tmp_path / "inductor") and (tmp_path / "inductor").is_dir()


def test_the_cli_uses_it_though_importing_inductor_wrote_its_default(tmp_path):
    """torch._inductor's import puts /tmp/torchinductor_USER into the environment before the
    CLI starts: that default is not taken for the user's choice."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    code = ("import os, afd_compile.cli; from afd_compile.compile_cache import ENV, use_compile_cache; "
            "assert os.environ.get(ENV), 'inductor no longer writes its default: this test is moot'; "
            "print(use_compile_cache())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "AFD_CACHE_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "inductor")


def test_a_directory_that_cannot_be_written_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"  # a path under a regular file: not even root can create it
    blocker.write_text("")
    monkeypatch.setenv(ENV, str(blocker / "inductor"))
    with caplog.at_level(logging.WARNING, logger="afd.compile"):
        assert use_compile_cache() is None
    assert len(caplog.records) == 1 and "is not writable" in caplog.text
    assert os.environ[ENV] != str(blocker / "inductor") and os.access(os.environ[ENV], os.W_OK)
