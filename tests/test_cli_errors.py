"""Bad command lines: one `afd: error:` line naming the bad value, a non-zero exit, no
traceback, and before anything loads (well within 10 s: nothing here may load the model)."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from tests.test_afd_errors import afd_cli, assert_clean_error


def busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


CASES = {
    "port out of range": (["serve", "--port", "80000"], ("80000", "1..65535")),
    "port 0": (["serve", "--port", "0"], ("0 is not a port",)),
    "port not a number": (["launch", "--afd-size", "1A1F", "--port", "http"], ("'http'",)),
    "unknown host": (["serve", "--host", "nosuch.invalid"], ("nosuch.invalid",)),
    "log level": (["serve", "--log-level", "loud"], ("--log-level", "LOUD", "INFO")),
    "dtype": (["generate", "--dtype", "float8", "1 2"], ("float8", "bfloat16")),
    "model directory": (["serve", "--model", "/no/such/model"], ("/no/such/model", "does not exist")),
    "afd_size": (["launch", "--afd-size", "3X"], ("3X", "xAyF")),
    "block size": (["serve", "--block-size", "24"], ("block_size", "power of two", "24")),
    "KV cache too small": (["serve", "--kv-cache-memory-bytes", "1000"], ("--kv-cache-memory-bytes 1000", "needs")),
    "no room for the ranks' ports": (["launch", "--afd-size", "2A1F", "--port", "65535"], ("65536", "2 ranks")),
}


@pytest.mark.parametrize("argv,needles", CASES.values(), ids=CASES.keys())
def test_bad_flag_is_one_line_before_loading(argv, needles):
    start = time.monotonic()
    proc = afd_cli(*argv, timeout=60)
    assert_clean_error(proc, *needles)
    assert time.monotonic() - start < 10
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda():
    start = time.monotonic()
    proc = afd_cli("generate", "--device", "cuda", "1 2", timeout=60)
    assert_clean_error(proc, "device 'cuda' is not available", "--device cpu")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("command", ["serve", "launch"])
def test_a_port_in_use_is_found_before_loading(command):
    """`afd launch --afd-size 2A1F` serves on port and port + 1: the second one busy is found too."""
    with busy_port() as s:
        taken = s.getsockname()[1]
        argv = ["serve", "--port", str(taken)] if command == "serve" else \
            ["launch", "--afd-size", "2A1F", "--port", str(taken - 1)]
        start = time.monotonic()
        proc = afd_cli(*argv, timeout=60)
    assert_clean_error(proc, f"127.0.0.1:{taken}", "in use")
    assert time.monotonic() - start < 10
