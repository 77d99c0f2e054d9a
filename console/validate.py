"""Checks every value a console form sends before anything is started; errors read as sentences."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from afd_compile.config import CONNECTORS, MAX_MICRO_BATCHES, check_model_dir
from afd_compile.errors import AfdError
from afd_compile.topology import Topology

MONOLITHIC = "monolithic"


class ConsoleError(AfdError):
    """An input the console refuses; its message is shown in the page as is."""


def _sentence(e: AfdError) -> str:
    text = str(e)
    return text[:1].upper() + text[1:] + "."


def model_dir(value) -> Path:
    try:
        return check_model_dir(str(value or "").strip()).resolve()
    except AfdError as e:
        raise ConsoleError(_sentence(e)) from None


def micro_batches(value) -> int:
    return integer(value, "Micro-batches", 1, MAX_MICRO_BATCHES)


def afd_size(value) -> Topology | None:
    """xAyF as a Topology; None for a monolithic (non-AFD) deployment."""
    text = str(value or "").strip()
    if text.lower() in ("", MONOLITHIC):
        return None
    try:
        return Topology.parse(text)
    except AfdError as e:
        raise ConsoleError(f"AFD size: {e}") from None


def integer(value, name: str, lo: int, hi: int) -> int:
    """An int in [lo, hi]; Gradio's Number gives floats, so 2.0 is accepted but 2.5 is not."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConsoleError(f"{name} must be a whole number, got {value!r}.") from None
    if number != int(number):
        raise ConsoleError(f"{name} must be a whole number, got {value!r}.")
    if not lo <= int(number) <= hi:
        raise ConsoleError(f"{name} must be between {lo} and {hi}, got {int(number)}.")
    return int(number)


def number(value, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConsoleError(f"{name} must be a number, got {value!r}.") from None
    if not (lo < x if lo_open else lo <= x) or x > hi:
        raise ConsoleError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {x:g}.")
    return x


def port(value, name: str = "Port", count: int = 1) -> int:
    """A TCP port such that port .. port + count - 1 are all valid (attention rank i serves port + i)."""
    return integer(value, name, 1024, 65535 - (count - 1))


def host(value) -> str:
    text = str(value or "").strip()
    if text == "localhost":
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConsoleError(f"Host must be an IP address such as 127.0.0.1 or 0.0.0.0, got {text!r}.") from None
    return text


def connector(value) -> str:
    text = str(value or "").strip().lower()
    if text not in CONNECTORS:
        raise ConsoleError(f"Connector must be one of {', '.join(CONNECTORS)}, got {value!r}.")
    return text


_NAME_LIST = re.compile(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*")


def name_list(value, name: str, allowed: tuple[str, ...] | None = None) -> str:
    """A comma-separated list of simple names or numbers, e.g. "1,16,64" or "compiled,eager"."""
    text = str(value or "").replace(" ", "")
    if not _NAME_LIST.fullmatch(text):
        raise ConsoleError(f"{name} must be a comma-separated list such as 1,16,64, got {value!r}.")
    if allowed is not None:
        bad = [v for v in text.split(",") if v not in allowed]
        if bad:
            raise ConsoleError(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}.")
    return text
