"""config.py is the ground floor: it loads without transformers or any other afd module above
topology, and it alone holds the names and limits the CLI, the ranks and the console check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from afd_compile.config import CONNECTORS, DEFAULT_MODEL, EP_DISPATCH, MAX_MICRO_BATCHES, AFDConfig, check_model_dir
from afd_compile.errors import AfdError
from console import validate


def test_config_imports_nothing_heavy():
    code = ("import sys, afd_compile.config; "
            "print(' '.join(m for m in sys.modules if m.startswith(('transformers', 'afd_compile', 'moe_kernels'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(loaded) == ["afd_compile", "afd_compile.config", "afd_compile.errors", "afd_compile.topology"]


def test_default_model_is_the_shipped_one():
    assert check_model_dir(DEFAULT_MODEL) == DEFAULT_MODEL


@pytest.mark.parametrize("path, message", [("", "is empty"), ("/no/such/dir", "does not exist"),
                                           ("{tmp}", "has no config.json")])
def test_model_dir_checked_once_for_cli_and_console(tmp_path, path, message):
    path = path.format(tmp=tmp_path)
    with pytest.raises(AfdError, match=message):
        check_model_dir(path)
    with pytest.raises(validate.ConsoleError, match=f"^Model directory .*{message}.*\\.$"):
        validate.model_dir(path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(micro_batches=MAX_MICRO_BATCHES + 1), f"1..{MAX_MICRO_BATCHES}"),
    (dict(micro_batches=0), f"1..{MAX_MICRO_BATCHES}"),
    (dict(connector="tcp"), "gloo, shm, nccl"),
    (dict(ep_dispatch="ring"), "sort, deepspeed"),
])
def test_afd_config_refuses(kwargs, message):
    with pytest.raises(AfdError, match=message):
        AFDConfig("1A1F", **kwargs)


def test_console_accepts_what_the_ranks_accept():
    for name in CONNECTORS:
        assert validate.connector(name) == name
    assert validate.micro_batches(MAX_MICRO_BATCHES) == MAX_MICRO_BATCHES
    with pytest.raises(validate.ConsoleError, match=str(MAX_MICRO_BATCHES)):
        validate.micro_batches(MAX_MICRO_BATCHES + 1)
    for dispatch in EP_DISPATCH:
        AFDConfig("1A2F", role="ffn", rank=1, ep_dispatch=dispatch)
