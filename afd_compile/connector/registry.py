"""Objects that custom ops reach by an int: an op's schema takes ints, not Python objects.

Ids are never reused (unlike id() once an object is freed), so an id left in a graph compiled
for a closed endpoint, or an earlier generation of the AFD world, can never find a newer one.
"""

from __future__ import annotations

import itertools
from typing import Generic, TypeVar

from afd_compile.connector.base import ConnectorError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # for the error: "AFD endpoint", "NCCL group"
        self._items: dict[int, T] = {}
        self._ids = itertools.count()

    def add(self, item: T) -> int:
        key = next(self._ids)
        self._items[key] = item
        return key

    def __getitem__(self, key: int) -> T:
        try:
            return self._items[key]
        except KeyError:
            raise ConnectorError(f"{self.what} {key} was released: its connector (an earlier generation of the "
                                 "AFD world) is closed") from None

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def remove(self, key: int) -> None:
        """Drops the registry's reference, so the object (a broken world's group, its sockets) can be freed."""
        self._items.pop(key, None)
